"""Save and load quantized models: ``model.safetensors`` (folded weights, quantizer state,
AdaLog q and tables) plus ``adalog.json`` (model name, constructor kwargs, config, version)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from adalog import __version__
from adalog.config import AdaLogConfig
from adalog.errors import ConfigError, WeightsError
from adalog.io import atomic_write, atomic_write_json
from adalog.models import create_model, load_weights, read_state_dict
from adalog.models.qmodules import QuantLinear, set_quant_mode
from adalog.models.wrap import wrap_model
from adalog.quant import UniformQuantizer
from adalog.recon.config import ReconstructConfig

FORMAT_VERSION = 1
META_FILE = "adalog.json"
WEIGHTS_FILE = "model.safetensors"
PROGRESS_META = "progress.json"
PROGRESS_WEIGHTS = "progress.safetensors"
EXTRAS_PREFIX = "__progress__."  # progress tensors that are not model state


def save_quantized(model: nn.Module, out_dir: str | Path) -> Path:
    """Write a calibrated model (see :func:`adalog.pipelines.calibrate.calibrate`)."""
    meta = getattr(model, "adalog_meta", None)
    if meta is None:
        raise ConfigError("model was not quantized by adalog (no adalog_meta); nothing to save")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    dtype = state_dtype(state)
    atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    meta = meta | {"dtype": str(dtype).removeprefix("torch."), "format_version": FORMAT_VERSION}
    atomic_write_json(out_dir / META_FILE, meta)
    return out_dir


def read_meta(qdir: str | Path) -> dict[str, Any]:
    path = Path(qdir) / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{qdir} is not an adalog checkpoint ({path}: {exc})") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConfigError(
            f"{path}: checkpoint format {meta.get('format_version')!r} is not supported by "
            f"adalog {__version__} (expects {FORMAT_VERSION})"
        )
    return meta


def load_quantized(
    qdir: str | Path, expected_model: str | None = None, dtype: torch.dtype | None = None
) -> nn.Module:
    """Rebuild the quantized model of ``qdir`` in quant mode; ``expected_model`` guards
    against evaluating a checkpoint made for another architecture. ``dtype`` defaults to the
    one the model was saved in (float32 for checkpoints that do not record it), so a float64
    calibration loads exactly."""
    meta = read_meta(qdir)
    dtype = dtype or _saved_dtype(meta, qdir)
    if expected_model is not None and expected_model.split(".")[0] != meta["model"].split(".")[0]:
        raise ConfigError(
            f"checkpoint {qdir} was made for model '{meta['model']}', not '{expected_model}'"
        )
    config = AdaLogConfig.from_dict(meta["config"])
    model = create_model(meta["model"], pretrained=False, **meta.get("model_kwargs", {}))
    wrap_model(model.to(dtype), config, calibrating=False)
    model.eval()
    state = read_state_dict(Path(qdir) / WEIGHTS_FILE)
    ensure_fold_biases(model, state)
    try:
        load_weights(model, state)
    except WeightsError as exc:
        raise ConfigError(f"checkpoint {qdir} does not match its model/config: {exc}") from exc
    model.adalog_meta = meta
    set_quant_mode(model, True)
    return model.eval()


def _saved_dtype(meta: dict[str, Any], qdir: str | Path) -> torch.dtype:
    """The float dtype a checkpoint was saved in (float32 when it does not record one)."""
    dtype = getattr(torch, str(meta.get("dtype", "float32")), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"checkpoint {qdir} records an unknown float dtype {meta['dtype']!r}")
    return dtype


def ensure_fold_biases(model: nn.Module, state: dict) -> None:
    """Give bias-free linears the bias a LayerNorm fold created (Swin reduction, §10.15), so a
    saved state loads strictly."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.bias is None and f"{name}.bias" in state:
            module.ensure_bias()


def save_progress(
    model: nn.Module,
    directory: str | Path,
    done_blocks: list[str],
    fingerprint: dict[str, Any],
    extras: dict[str, Tensor] | None = None,
    record: dict[str, Any] | None = None,
) -> None:
    """Record a partly calibrated (or reconstructed) model: its state, the blocks already done,
    and optionally ``extras`` tensors (e.g. random generator states) and a JSON ``record``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state |= {EXTRAS_PREFIX + k: v.detach().contiguous() for k, v in (extras or {}).items()}
    atomic_write(directory / PROGRESS_WEIGHTS, lambda tmp: save_file(state, str(tmp)))
    meta = {"format_version": FORMAT_VERSION, "done_blocks": done_blocks} | fingerprint
    atomic_write_json(directory / PROGRESS_META, meta | {"record": record or {}})


def load_progress(
    model: nn.Module, directory: str | Path, fingerprint: dict[str, Any]
) -> list[str]:
    """Restore the state saved by :func:`save_progress` and return the blocks done (none if
    ``directory`` holds no progress). Progress of another model, config or set of calibration
    images is refused: resuming it would mix two runs."""
    meta_path = Path(directory) / PROGRESS_META
    if not meta_path.exists():
        return []
    meta = read_progress_meta(directory)
    for key, config_type in (("config", AdaLogConfig), ("reconstruct", ReconstructConfig)):
        if isinstance(meta.get(key), dict):  # fields added to the config since: defaults
            try:
                meta[key] = config_type.from_dict(meta[key]).to_dict()
            except ConfigError:
                pass  # reported as a differing config below
    differing = [k for k in fingerprint if meta.get(k) != fingerprint[k]]
    if meta.get("format_version") != FORMAT_VERSION or differing:
        raise ConfigError(
            f"{meta_path} records another run (differs in: "
            f"{', '.join(differing) or 'format_version'}); use a fresh resume folder"
        )
    state = read_progress_state(directory)
    _adopt_shapes(model, state)
    try:
        load_weights(model, state)
    except WeightsError as exc:
        raise ConfigError(f"{directory}: progress does not match the model: {exc}") from exc
    return list(meta["done_blocks"])


def tensor_digest(tensors: list[Tensor]) -> str:
    """SHA-256 of the tensors' bytes in order: identifies images or a model state in a
    progress fingerprint."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def read_progress_meta(directory: str | Path) -> dict[str, Any]:
    """The JSON record :func:`save_progress` wrote (``done_blocks``, fingerprint, record)."""
    meta_path = Path(directory) / PROGRESS_META
    try:
        return json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{meta_path}: unreadable progress ({exc})") from exc


def state_dtype(state: dict[str, Tensor]) -> torch.dtype:
    """The float dtype of a model state (float32 if it holds no float tensor)."""
    return next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)


def read_progress_state(directory: str | Path) -> dict:
    """The model state saved by :func:`save_progress` (pre-fold: §4's shift not yet in the
    bias)."""
    state = read_state_dict(Path(directory) / PROGRESS_WEIGHTS)
    return {k: v for k, v in state.items() if not k.startswith(EXTRAS_PREFIX)}


def read_progress_extras(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The ``extras`` tensors and the ``record`` that :func:`save_progress` stored with the
    state (both empty if none were given)."""
    directory = Path(directory)
    state = read_state_dict(directory / PROGRESS_WEIGHTS)
    extras = {k[len(EXTRAS_PREFIX) :]: v for k, v in state.items() if k.startswith(EXTRAS_PREFIX)}
    return extras, read_progress_meta(directory).get("record", {})


def _adopt_shapes(model: nn.Module, state: dict) -> None:
    """Shape the model like a calibrated state: fold-created biases, and post-LN input
    quantizers that went from per-channel to per-tensor parameters (§3)."""
    ensure_fold_biases(model, state)
    for name, module in model.named_modules():
        scale = state.get(f"{name}.scale")
        if isinstance(module, UniformQuantizer) and scale is not None:
            module.set_params(scale, state[f"{name}.zero_point"])


def load_partial_state(model: nn.Module, state: dict, prefixes: list[str]) -> None:
    """Copy the entries of ``state`` under the module ``prefixes`` into ``model`` (shapes
    adopted as in :func:`load_progress`); every such entry must exist in the model."""
    part = {k: v for k, v in state.items() if any(k.startswith(f"{p}.") for p in prefixes)}
    _adopt_shapes(model, part)
    result = model.load_state_dict(part, strict=False)
    if result.unexpected_keys:
        raise ConfigError(f"state entries unknown to the model: {result.unexpected_keys[:8]}")


def quantization_meta(
    model_name: str, config: AdaLogConfig, model_kwargs: dict[str, Any] | None = None
) -> dict[str, Any]:
    return {
        "adalog_version": __version__,
        "model": model_name,
        "model_kwargs": model_kwargs or {},
        "config": config.to_dict(),
        "bits": {"w": config.w_bits, "a": config.a_bits, "s": config.s_bits},
    }
