"""torchrun scale-out: two gloo CPU processes spawned by the test against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

import adalog
from adalog.config import AdaLogConfig
from adalog.distributed import Ranks, shard
from adalog.pipelines.ablation import Variant, _claim
from adalog.pipelines.export import export_artifact
from tests.conftest import write_image

NAME = "vit_tiny_patch16_224"
TINY = {"depth": 1, "img_size": 32, "patch_size": 16, "embed_dim": 24, "num_heads": 2}
WNIDS = ["n01440764", "n01443537", "n01484850"]
QUICK = AdaLogConfig.w4a4(eq_n=32, search_rounds=1, fpcs_steps=2)
#: Seconds a spawned job may take before the test fails instead of hanging.
JOB_TIMEOUT = 300


def _run(args: list[str], nproc: int, cwd: Path) -> subprocess.CompletedProcess:
    """``adalog ARGS`` in one process, or under torchrun with ``nproc`` gloo CPU ranks; one
    thread per process either way (torchrun's default), so both compute the same floats."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launcher += ["--nproc_per_node", str(nproc)]
    command = [*launcher, "-m", "adalog.cli"] if nproc > 1 else [sys.executable, "-m", "adalog.cli"]
    done = subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=JOB_TIMEOUT
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


@pytest.fixture
def nine_images(tmp_path: Path) -> tuple[Path, Path]:
    """Nine 40-pixel images in three classes (an odd count: the two shards differ in size) and a
    label map onto a 3-class head."""
    root = tmp_path / "images"
    for c, wnid in enumerate(WNIDS):
        for i in range(3):
            write_image(root / wnid / f"{wnid}_{i}.png", seed=10 * c + i)
    label_map = tmp_path / "labels.json"
    label_map.write_text(json.dumps({wnid: c for c, wnid in enumerate(WNIDS)}))
    return root, label_map


def _tiny_weights(tmp_path: Path, num_classes: int = 3) -> Path:
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    model = timm.create_model(NAME, pretrained=False, num_classes=num_classes, **TINY)
    save_file(model.state_dict(), str(weights))
    return weights


def _calibration_args(weights: Path, data: Path, config: Path) -> list[str]:
    """The tiny ViT, its calibration images and the quick config, as CLI arguments."""
    args = ["--model", NAME, "--weights", str(weights), "--model-kwargs", json.dumps(TINY)]
    return args + ["--calib-data", str(data), "--config", str(config)]


def test_shards_cover_every_item_once():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            items = [i for r in range(world) for i in shard(n, Ranks(r, world))]
            assert sorted(items) == list(range(n))


def test_a_claim_of_an_earlier_job_does_not_block(tmp_path: Path):
    variant = Variant("gelu-uniform", {"post_gelu": "uniform"})
    ranks = Ranks(0, 2)
    assert _claim(tmp_path / "claims" / "job1", variant, ranks)
    assert not _claim(tmp_path / "claims" / "job1", variant, Ranks(1, 2))
    assert _claim(tmp_path / "claims" / "job2", variant, Ranks(1, 2))  # the dead job's claim


@pytest.mark.parametrize("source", ["fp", "artifact"])
def test_eval_on_two_ranks_equals_one_process(tmp_path: Path, nine_images, source: str):
    data, label_map = nine_images
    weights = _tiny_weights(tmp_path)
    model_args = ["--model", NAME, "--weights", str(weights)]
    model_args += ["--model-kwargs", json.dumps(TINY | {"num_classes": 3})]
    if source == "artifact":  # a fake-quant checkpoint exported for the exact integer engine
        model = adalog.models.create_model(NAME, weights=weights, **TINY, num_classes=3)
        images = torch.randn(4, 3, 32, 32)
        kwargs = TINY | {"num_classes": 3}
        qmodel = adalog.quantize(model, images, QUICK, progress=False, model_kwargs=kwargs)
        adalog.save_quantized(qmodel, tmp_path / "q")
        export_artifact(tmp_path / "q", tmp_path / "art")
        model_args = ["--artifact", str(tmp_path / "art"), "--engine", "reference"]
    results = {}
    for nproc in (1, 2):
        out = tmp_path / f"eval_{nproc}.json"
        args = ["eval", *model_args, "--data", str(data), "--label-map", str(label_map)]
        args += ["--batch-size", "2", "--workers", "0", "--json", str(out)]
        _run(args, nproc, tmp_path)
        results[nproc] = json.loads(out.read_text())
    assert results[2]["n"] == 9 and results[2]["ranks"] == 2 and results[1]["ranks"] == 1
    for key in ("top1", "top5", "n", "skipped_images", "model"):
        assert results[2][key] == results[1][key], key


def test_ablation_split_over_two_ranks_equals_one_process(tmp_path: Path, nine_images):
    data, _ = nine_images
    weights = _tiny_weights(tmp_path, num_classes=1000)
    config = tmp_path / "small.json"
    QUICK.with_overrides(calib_size=4).save(config)
    tables = {}
    for nproc in (1, 2):
        out = tmp_path / f"run_{nproc}"
        args = ["ablate", *_calibration_args(weights, data, config)]
        args += ["--data", str(data), "--out", str(out)]
        args += ["--sets", "post-gelu", "fpcs", "--variants", "gelu-uniform", "exhaustive"]
        args += ["--workers", "0"]
        _run(args, nproc, tmp_path)
        assert not (out / "claims").exists()
        assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"
        variants = {p.stem: json.loads(p.read_text()) for p in (out / "variants").glob("*.json")}
        assert sorted(variants) == ["exhaustive", "gelu-uniform"]
        ran_on = sorted(v["rank"] for v in variants.values())
        assert ran_on == (["0 of 1"] * 2 if nproc == 1 else ["0 of 2", "1 of 2"])
        rows = json.loads((out / "results.json").read_text())
        tables[nproc] = (
            [{k: v for k, v in row.items() if k != "calib_seconds"} for row in rows],
            {name: (v["top1"], v["top5"], v["details"]) for name, v in variants.items()},
            json.loads((out / "fp32.json").read_text())["top1"],
        )
    assert tables[2] == tables[1]
    assert [row["variant"] for row in tables[1][0]] == ["gelu-uniform", "exhaustive"]


#: Data-parallel reconstruction against one process: the ranks sum their shares of a batch in
#: another order than one process sums the whole batch, so the trained values agree to float32
#: rounding amplified by the training steps, and a few AdaRound decisions right at the rounding
#: boundary may go the other way (docs/guide.md, "Several processes").
RECON_TOLERANCE = {"logits_max_abs": 1e-5, "codes_changed_fraction": 1e-3}


def test_reconstruction_on_two_ranks_matches_one_process(tmp_path: Path, nine_images):
    from adalog.pipelines.checkpoint import load_quantized
    from adalog.recon.config import ReconstructConfig

    data, _ = nine_images
    weights = _tiny_weights(tmp_path, num_classes=1000)
    config = tmp_path / "small.json"
    QUICK.with_overrides(calib_size=4).save(config)
    recon = tmp_path / "recon.json"
    ReconstructConfig.fast(
        iterations=30, data_size=16, batch_size=8, weight_lr=1e-2, network_iterations=6
    ).with_overrides(train_bias_norm=True).save(recon)
    models = {}
    for nproc in (1, 2):
        out = tmp_path / f"q_{nproc}"
        args = ["quantize", *_calibration_args(weights, data, config)]
        args += ["--reconstruct", str(recon), "--out", str(out)]
        _run(args, nproc, tmp_path)  # fails if the two ranks end with different models
        models[nproc] = load_quantized(out)
    state1, state2 = models[1].state_dict(), models[2].state_dict()
    assert state1.keys() == state2.keys()
    calibrated = load_quantized(tmp_path / "q_1" / "calibrated").state_dict()
    trained = [k for k in state1 if not torch.equal(state1[k], calibrated[k])]
    assert len(trained) > 10  # the reconstruction moved weights, scales and biases
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits1, logits2 = models[1](images), models[2](images)
    assert (logits1 - logits2).abs().max() <= RECON_TOLERANCE["logits_max_abs"]
    changed = total = 0
    for module1, module2 in zip(models[1].modules(), models[2].modules(), strict=True):
        if hasattr(module1, "quantized_weight"):
            codes1, codes2 = module1.quantized_weight(), module2.quantized_weight()
            changed += int((codes1 != codes2).sum())
            total += codes1.numel()
    assert changed <= RECON_TOLERANCE["codes_changed_fraction"] * total
