"""Device leaks caught on the CPU: every pipeline runs with the default device set to ``meta``
while the model and images sit on the CPU. A tensor created without the data's device then
lands on ``meta``, and the first op that mixes it with real data fails (or a ``.item()`` on it
does), so these tests fail on any allocation that would miss the GPU."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import timm
import torch

import adalog
from adalog.config import AdaLogConfig
from adalog.pipelines.ablation import run_ablation, select_variants
from adalog.recon.config import ReconstructConfig

CONFIG = AdaLogConfig.w4a4(eq_n=32, search_rounds=1, fpcs_steps=2)
RECON = ReconstructConfig.fast(
    iterations=4, network_iterations=2, data_size=8, batch_size=4, kl_tail=0
)
MODELS = {
    "vit": (
        "vit_tiny_patch16_224",
        {"depth": 1, "img_size": 32, "patch_size": 16, "embed_dim": 24, "num_heads": 2},
        32,
    ),
    "swin": (
        "swin_tiny_patch4_window7_224",
        {"img_size": 64, "window_size": 4, "depths": (1, 1), "num_heads": (1, 2), "embed_dim": 24},
        64,
    ),
}


@contextmanager
def default_device_meta() -> Iterator[None]:
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _model_and_images(family: str) -> tuple[torch.nn.Module, torch.Tensor]:
    name, kwargs, size = MODELS[family]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    images = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    return model, images


def _assert_on_cpu(model: torch.nn.Module) -> None:
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)


@pytest.mark.parametrize("family", sorted(MODELS))
@pytest.mark.parametrize(
    "overrides",
    [{}, {"search_engine": "naive"}, {"weight_rounding": "gptq", "rotate_values": True}],
    ids=["fast", "naive", "gptq-rotated"],
)
def test_calibration_creates_every_tensor_on_the_data_device(family: str, overrides: dict):
    model, images = _model_and_images(family)
    with default_device_meta():
        adalog.quantize(model, images, CONFIG.with_overrides(**overrides), progress=False)
        with torch.no_grad():
            logits = model(images)
    _assert_on_cpu(model)
    assert logits.device.type == "cpu" and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", sorted(MODELS))
def test_reconstruction_creates_every_tensor_on_the_data_device(family: str):
    model, images = _model_and_images(family)
    adalog.quantize(model, images, CONFIG, progress=False)
    with default_device_meta():
        adalog.reconstruct(model, images, RECON, progress=False)
        with torch.no_grad():
            logits = model(images)
    _assert_on_cpu(model)
    assert torch.isfinite(logits).all()


def test_ablation_variants_create_every_tensor_on_the_data_device(tmp_path: Path):
    """A full-run variant and a partial one (fc2 searched again on the base calibration)."""
    model, images = _model_and_images("vit")

    def make_model() -> torch.nn.Module:  # the user's models live on the CPU
        with torch.device("cpu"):
            return _model_and_images("vit")[0]

    def evaluate(quantized: torch.nn.Module) -> dict:
        with torch.no_grad():
            top = quantized(images).argmax(-1)
        return {"top1": float((top == 0).float().mean()), "top5": 1.0, "n": len(top)}

    variants = select_variants(["fpcs", "post-gelu"], ["exhaustive", "gelu-twin"])
    assert [v.name for v in variants] == ["exhaustive", "gelu-twin"]
    with default_device_meta():
        rows = run_ablation(tmp_path, variants, CONFIG, make_model, images, evaluate, None, False)
    assert [r["variant"] for r in rows] == ["exhaustive", "gelu-twin"]
    assert rows[1]["searched"] == "fc2"


def test_the_cuda_gram_path_equals_the_int8_gemm():
    """The float64 GEMM the fast search uses on CUDA gives the int8 GEMM's exact Gram and sums
    (checked here on the CPU, where both run)."""
    from adalog.search.objectives import int8_gram

    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (24, 3000), generator=g, dtype=torch.int8)
    ones = torch.ones(3000, 8, dtype=torch.int8)
    gram, sums = int8_gram(codes, ones)
    wide_gram, wide_sums = int8_gram(codes, ones, wide=True)
    assert torch.equal(gram, wide_gram) and torch.equal(sums, wide_sums)
    expected = codes.long() @ codes.long().T
    assert torch.equal(gram, expected.double()) and torch.equal(sums, codes.long().sum(1).double())


def _tf32_settings() -> tuple:
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        return torch.backends.cuda.matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_exact_matmuls_turn_tf32_off_and_restore_the_callers_setting():
    """Also with TF32 switched on through torch's newer ``fp32_precision`` API, under which
    reading the legacy ``allow_tf32`` flags raises."""
    from adalog.devices import exact_matmuls

    new_api = hasattr(torch.backends.cuda.matmul, "fp32_precision")
    saved = _tf32_settings()
    try:
        if new_api:
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.cudnn.conv.fp32_precision = "tf32"
        else:
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        before = _tf32_settings()
        with pytest.raises(RuntimeError, match="inside"), exact_matmuls():
            assert _tf32_settings() == (("ieee", "ieee") if new_api else (False, False))
            raise RuntimeError("inside")
        assert _tf32_settings() == before
        with exact_matmuls(enabled=False):  # data on the CPU: nothing touched
            assert _tf32_settings() == before
    finally:
        if new_api:
            torch.backends.cuda.matmul.fp32_precision = saved[0]
            torch.backends.cudnn.conv.fp32_precision = saved[1]
        else:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_bad_devices_are_refused_with_a_clear_error():
    from adalog.devices import resolve_device
    from adalog.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda:1")


def test_device_argument_moves_the_model_and_checkpoints_stay_on_the_cpu(tmp_path: Path):
    from adalog.devices import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected and resolve_device("cpu").type == "cpu"
    model, images = _model_and_images("vit")
    kwargs = MODELS["vit"][1]
    adalog.quantize(model, images, CONFIG, progress=False, device="auto", model_kwargs=kwargs)
    assert {p.device.type for p in model.parameters()} == {expected}
    adalog.save_quantized(model, tmp_path / "q")
    loaded = adalog.load_quantized(tmp_path / "q")
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    with torch.no_grad():  # the same device on both sides: CPU and CUDA sums differ
        assert torch.equal(loaded.to(expected)(images.to(expected)), model(images.to(expected)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", sorted(MODELS))
def test_cuda_calibration_matches_the_cpu_one(family: str):
    """In float64 (so float rounding seldom breaks a near-tie differently), CUDA and the CPU
    choose the same parameters: at least 95 % of the quantized model's tensors agree to 1e-6
    relative, and the logits to 1e-3."""
    cpu_model, images = _model_and_images(family)
    gpu_model, _ = _model_and_images(family)
    cpu_model, gpu_model, images = cpu_model.double(), gpu_model.double(), images.double()
    adalog.quantize(cpu_model, images, CONFIG, progress=False)
    adalog.quantize(gpu_model, images, CONFIG, progress=False, device="cuda")
    gpu_state = {k: v.cpu() for k, v in gpu_model.state_dict().items()}
    state = cpu_model.state_dict()
    agree = [torch.allclose(gpu_state[k].double(), v.double(), rtol=1e-6) for k, v in state.items()]
    assert sum(agree) >= 0.95 * len(agree)
    with torch.no_grad():
        gpu_logits = gpu_model(images.cuda()).cpu()
        assert torch.allclose(gpu_logits, cpu_model(images), rtol=1e-3, atol=1e-3)
