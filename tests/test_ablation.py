"""Ablation runner: variants use the intended quantizers, finished variants are not rerun."""

import json
from pathlib import Path

import pytest
import timm
import torch

import adalog
import adalog.cli
import adalog.pipelines.calibrate as calibrate_module
from adalog.config import AdaLogConfig
from adalog.errors import ConfigError
from adalog.models.parts import TIMM_VIT
from adalog.pipelines import ablation
from adalog.pipelines.ablation import Variant, run_ablation, select_variants
from adalog.pipelines.calibrate import Reuse
from adalog.pipelines.runstore import read_progress_meta, read_progress_state
from adalog.quant import LogQuantizer, TwinUniformQuantizer, UniformQuantizer

TINY = {"depth": 1, "img_size": 64, "patch_size": 16, "embed_dim": 32, "num_heads": 2}
BASE = AdaLogConfig.w4a4(eq_n=32, search_rounds=1, fpcs_steps=2)


def _tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()


def test_variant_sets_cover_the_paper_tables():
    gelu = [v.overrides for v in select_variants(["post-gelu"])]
    assert {o["post_gelu"] for o in gelu} == {"uniform", "twin", "log2", "logsqrt2", "adalog"}
    assert sum(o.get("bias_reparam") is False for o in gelu) == 3  # log kinds only
    softmax = select_variants(["post-softmax"])
    assert {(v.overrides["post_softmax"], v.overrides["s_bits"]) for v in softmax} == {
        (k, b) for k in ("uniform", "log2", "logsqrt2", "adalog") for b in (4, 3, 2)
    }
    assert [v.name for v in select_variants(["fpcs"], ["exhaustive"])] == ["exhaustive"]
    with pytest.raises(ConfigError, match="unknown variant set"):
        select_variants(["nope"])
    with pytest.raises(ConfigError, match="unknown variant"):
        select_variants(["fpcs"], ["nope"])


def test_variants_quantize_with_the_intended_quantizers_and_resume(tmp_path: Path, monkeypatch):
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    seen = []

    def inspect(model):
        fc2 = model.blocks[0].mlp.fc2.input_quant
        softmax = model.blocks[0].attn.matmul2.a_quant
        seen.append((type(fc2), getattr(fc2, "kind", None), float(getattr(fc2, "shift", -1))))
        seen.append((type(softmax), getattr(softmax, "kind", None), softmax.n_bits))
        return {}

    variants = [
        Variant("twin", {"post_gelu": "twin"}, "post-gelu"),
        Variant("log2-raw", {"post_gelu": "log2", "bias_reparam": False}, "post-gelu"),
        Variant("softmax-uniform-s3", {"post_softmax": "uniform", "s_bits": 3}, "post-softmax"),
    ]
    evaluate = lambda model: {"top1": 0.5, "top5": 0.75, "n": 4}  # noqa: E731
    run_ablation(tmp_path, variants[:2], BASE, _tiny, images, evaluate, inspect, progress=False)
    assert seen[0][0] is TwinUniformQuantizer
    assert seen[2] == (LogQuantizer, "log2", 0.0)  # no shift without the reparameterization
    assert seen[3] == (LogQuantizer, "adalog", 4)
    first = json.loads((tmp_path / "variants" / "twin.json").read_text())

    calls = []  # True: a variant's calibration; False: the base's (resumed from base/)
    real = ablation.calibrate

    def counting(*args, **kwargs):
        calls.append(kwargs.get("resume_dir") is None)
        return real(*args, **kwargs)

    monkeypatch.setattr(ablation, "calibrate", counting)
    results = run_ablation(tmp_path, variants, BASE, _tiny, images, evaluate, inspect, False)
    assert calls.count(True) == 1  # only the new variant ran
    assert read_progress_meta(tmp_path / "base")["done_blocks"]
    assert seen[-1] == (UniformQuantizer, None, 3)
    assert [r["variant"] for r in results] == ["twin", "log2-raw", "softmax-uniform-s3"]
    assert json.loads((tmp_path / "variants" / "twin.json").read_text()) == first
    table = (tmp_path / "results.md").read_text()
    assert "| twin | 50.0 % | – |" in table  # Table B pivot: reparam on / off columns
    assert "| log2 (AdaLog scale) | – | 50.0 % |" in table
    assert "| post-Softmax quantizer | 3-bit |\n|---|---|\n| uniform | 50.0 % |" in table
    assert table.count("| softmax-uniform-s3 | post-softmax |") == 1  # the flat table
    assert (tmp_path / "results.csv").read_text().startswith("variant,group,post_gelu")


def test_tables_gather_every_finished_variant_in_set_order(tmp_path: Path):
    """Invocations with other variant lists share one run folder: the tables hold them all."""
    evaluate = lambda model: {"top1": 0.25, "top5": 0.5, "n": 4}  # noqa: E731
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    late, early = select_variants(["fpcs"], ["fpcs"]), select_variants(["post-gelu"], ["gelu-twin"])
    run_ablation(tmp_path, late, BASE, _tiny, images, evaluate, progress=False)
    run_ablation(tmp_path, early, BASE, _tiny, images, evaluate, progress=False)
    (tmp_path / "fp32.json").write_text(json.dumps({"top1": 0.75, "top5": 0.875, "n": 4}))
    ablation.write_tables(tmp_path, ablation.all_results(tmp_path))
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["variant"] for r in rows] == ["gelu-twin", "fpcs"]
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("FP32 model: top-1 75.0 %, top-5 87.5 %.")
    assert "| FPCS | 25.0 % |" in table


def test_cli_ablate_writes_tables_and_plots(tmp_path: Path, random_deit_and_images):
    weights, data = random_deit_and_images
    config = tmp_path / "small.yaml"
    BASE.with_overrides(calib_size=2, search_rounds=1).save(config)
    out = tmp_path / "run"
    argv = ["ablate", "--model", "deit_tiny_patch16_224", "--weights", str(weights)]
    argv += ["--calib-data", str(data), "--data", str(data), "--config", str(config)]
    argv += ["--out", str(out), "--variants", "gelu-uniform", "gelu-adalog", "--workers", "0"]
    assert adalog.cli.main(argv) == 0
    rows = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in rows] == ["gelu-uniform", "gelu-adalog"]
    assert set(json.loads((out / "fp32.json").read_text())) == {"top1", "top5", "n", "fingerprint"}
    assert (out / "results.md").read_text().startswith("FP32 model: top-1")
    for png in ("accuracy.png", "levels_post_gelu.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    details = json.loads((out / "variants" / "gelu-adalog.json").read_text())["details"]
    assert len(details["post_gelu"]) == 17  # 16 AdaLog levels and the zero state


@pytest.mark.parametrize("kind", ["log2", "logsqrt2"])
def test_transplanted_log_quantizer_rounds_run_with_adalog(kind):
    """§5.7(C): under the reference 'transplant' option every round, weight search included,
    uses the AdaLog quantizer; only the final scale moves into the log2/log√2 quantizer. So fc2's
    weights and input scale equal those of the AdaLog run; with 'own' they do not."""
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    config = BASE.with_overrides(search_rounds=2)

    def fc2_after(**overrides):
        model = _tiny()
        adalog.quantize(model, images, config.with_overrides(**overrides))
        fc2 = model.blocks[0].mlp.fc2
        return fc2.weight_quant.scale.clone(), fc2.input_quant

    w_ada, q_ada = fc2_after()
    w_tr, q_tr = fc2_after(post_gelu=kind)
    assert q_tr.kind == kind and q_ada.kind == "adalog"
    assert torch.equal(w_tr, w_ada) and torch.equal(q_tr.scale, q_ada.scale)
    w_own, q_own = fc2_after(post_gelu=kind, log_scale_search="own")
    assert not (torch.equal(w_own, w_ada) and torch.equal(q_own.scale, q_ada.scale))


@pytest.mark.parametrize(
    "overrides",
    [
        {"post_gelu": "twin"},
        {"post_gelu": "logsqrt2", "bias_reparam": False},
        {"post_softmax": "log2", "s_bits": 3},
    ],
)
def test_variant_from_reused_base_calibration_equals_a_full_run(
    tmp_path: Path, monkeypatch, overrides
):
    """Only fc2 (matmul2) is searched again; everything else, folds included, comes from the
    base calibration, and the result is bit-identical to calibrating the variant from scratch."""
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    config = BASE.with_overrides(**overrides)

    def model():
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, **(TINY | {"depth": 2}))

    full = adalog.quantize(model(), images, config, progress=False)
    adalog.quantize(model(), images, BASE, progress=False, resume_dir=tmp_path)
    parts = ablation.searched_parts(overrides)
    reuse = Reuse(read_progress_state(tmp_path), lambda name: TIMM_VIT.part_of(name) in parts)
    searched: list[str] = []
    real = calibrate_module._calibrate_target

    def recording(model, target, *args):
        searched.append(target.name)
        return real(model, target, *args)

    monkeypatch.setattr(calibrate_module, "_calibrate_target", recording)
    part = calibrate_module.calibrate(model(), images, config, progress=False, reuse=reuse)
    expected = full.state_dict()
    assert part.state_dict().keys() == expected.keys()
    for key, value in part.state_dict().items():
        assert torch.equal(value, expected[key]), key
    leaf = {"fc2": "mlp.fc2", "matmul_av": "attn.matmul2"}
    assert len(searched) == 2 and all(n.endswith(tuple(leaf[p] for p in parts)) for n in searched)
    assert ablation.searched_parts({"fpcs": False}) is None
    assert ablation.searched_parts({"post_gelu": "twin", "eq_n": 64}) is None


def test_rerun_with_another_base_model_or_eval_set_is_refused(tmp_path: Path):
    """A finished variant is reused only by the run that made it: another base config, other
    starting weights or another evaluation set is refused, naming what differs."""
    evaluate = lambda model: {"top1": 0.5, "top5": 0.75, "n": 4}  # noqa: E731
    images = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    variants = select_variants(["fpcs"], ["fpcs"])
    run_ablation(tmp_path, variants, BASE, _tiny, images, evaluate, progress=False)
    saved = json.loads((tmp_path / "variants" / "fpcs.json").read_text())["fingerprint"]
    assert saved["model"] == "vit_tiny_patch16_224.augreg_in21k_ft_in1k"

    def other_weights() -> torch.nn.Module:
        torch.manual_seed(3)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY).eval()

    cases = [
        ((BASE.with_overrides(eq_n=16), _tiny, {}), r"eq_n 32 -> 16"),
        ((BASE, other_weights, {}), r"weights_sha256 \(other starting weights\)"),
        ((BASE, _tiny, {"n": 9}), r"eval_data \(another evaluation image set\)"),
    ]
    for (base, make_model, eval_data), message in cases:
        with pytest.raises(ConfigError, match=message):
            run_ablation(tmp_path, variants, base, make_model, images, evaluate,
                         progress=False, eval_data=eval_data)  # fmt: skip
    again = run_ablation(tmp_path, variants, BASE, _tiny, images, evaluate, progress=False)
    assert again[0]["fingerprint"] == saved
