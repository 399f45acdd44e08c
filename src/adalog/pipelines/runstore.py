"""One store for resumable runs (calibration, reconstruction, ablation).

A run is identified by a *fingerprint*: what produced it (the model's full timm name with its
pretrained tag, constructor kwargs and a digest of its starting weights, the config, a digest of
the calibration images, the adalog version). Saved progress or results whose fingerprint differs
from the current run's are refused with a message naming what differs, so a rerun never mixes
two runs.

Progress is one safetensors file: the model state, extra tensors (e.g. random generator states)
and, in its header, the JSON record (fingerprint, finished steps, a free-form record). It is
written to a temporary file and renamed, so a crash leaves either the previous step or the new
one, never a state from one step with the bookkeeping of another.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from adalog._version import __version__
from adalog.config import AdaLogConfig
from adalog.errors import ConfigError, WeightsError
from adalog.io import atomic_write
from adalog.models import load_weights, read_state_dict
from adalog.models.qmodules import QuantLinear
from adalog.quant import UniformQuantizer
from adalog.recon.config import ReconstructConfig

PROGRESS_FORMAT = 2
PROGRESS_WEIGHTS = "progress.safetensors"
EXTRAS_PREFIX = "__progress__."  # progress tensors that are not model state
_HEADER_KEY = "adalog_progress"
#: Fingerprint entries that hold a config: read back through the config class, so fields added
#: to it since the progress was saved take their defaults instead of counting as differences.
_CONFIG_KEYS = {"config": AdaLogConfig, "reconstruct": ReconstructConfig}
#: What a differing fingerprint entry means, for the refusal message.
_MEANING = {
    "model": "another model or pretrained tag",
    "model_kwargs": "other model constructor kwargs",
    "weights_sha256": "other starting weights",
    "start_state_sha256": "another starting model state",
    "images_sha256": "other calibration images",
    "config": "another config",
    "reconstruct": "another reconstruction config",
    "eval_data": "another evaluation image set",
    "adalog_version": "another adalog version",
}


def tensor_digest(tensors: list[Tensor]) -> str:
    """SHA-256 of the tensors' bytes in order: identifies images or a model state."""
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def state_digest(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (keys sorted): which weights a run started from."""
    state = model.state_dict()
    return tensor_digest([state[k] for k in sorted(state)])


def full_model_name(model: nn.Module) -> str:
    """``architecture.tag`` from timm's pretrained config (the tag decides preprocessing and
    the classifier size), the architecture alone when the model has no tag."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    arch = cfg.get("architecture", type(model).__name__)
    tag = cfg.get("tag")
    return f"{arch}.{tag}" if tag else str(arch)


def model_kwargs_of(model: nn.Module) -> dict[str, Any]:
    """The timm constructor kwargs beyond the name: those :func:`adalog.models.create_model`
    recorded, or for a model built elsewhere the classifier size when it differs from the
    pretrained config's (the one kwarg a reload cannot guess)."""
    recorded = getattr(model, "adalog_model_kwargs", None)
    if recorded is not None:
        return dict(recorded)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != cfg.get("num_classes", num_classes):
        return {"num_classes": num_classes}
    return {}


def model_identity(model: nn.Module) -> dict[str, Any]:
    """Model name with tag, constructor kwargs and starting-weights digest (call it before the
    model is changed)."""
    return {
        "model": full_model_name(model),
        "model_kwargs": model_kwargs_of(model),
        "weights_sha256": state_digest(model),
    }


def run_fingerprint(identity: dict[str, Any], **parts: Any) -> dict[str, Any]:
    """A fingerprint: the model identity, the named parts (configs as dicts, digests) and the
    adalog version, normalised to what reads back from JSON."""
    parts = {k: v.to_dict() if hasattr(v, "to_dict") else v for k, v in parts.items()}
    fingerprint = identity | parts | {"adalog_version": __version__}
    return json.loads(json.dumps(fingerprint))


def fingerprint_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per differing entry of ``now``: what it means, the saved and the current value
    (config entries field by field, digests shortened)."""
    lines = []
    for key, value in now.items():
        old = _normalised(key, saved.get(key))
        if old == value:
            continue
        meaning = _MEANING.get(key, key)
        if isinstance(old, dict) and isinstance(value, dict):
            fields = sorted(k for k in set(old) | set(value) if old.get(k) != value.get(k))
            shown = ", ".join(f"{k} {_short(old.get(k))} -> {_short(value.get(k))}" for k in fields)
            lines.append(f"{key} ({meaning}): {shown}")
        else:
            lines.append(f"{key} ({meaning}): saved {_short(old)}, now {_short(value)}")
    return lines


def check_fingerprint(saved: dict[str, Any], now: dict[str, Any], source: str | Path) -> None:
    """Refuse ``saved`` work (from ``source``) made by another run than ``now``."""
    differing = fingerprint_differences(saved, now)
    if differing:
        raise ConfigError(
            f"{source} was made by another run; it differs in:\n  "
            + "\n  ".join(differing)
            + "\nuse a fresh folder (or delete this one) to start over"
        )


def _normalised(key: str, value: Any) -> Any:
    config_type = _CONFIG_KEYS.get(key)
    if config_type is not None and isinstance(value, dict):
        try:
            return config_type.from_dict(value).to_dict()
        except ConfigError:
            return value
    return value


def _short(value: Any) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def save_progress(
    model: nn.Module,
    directory: str | Path,
    done_blocks: list[str],
    fingerprint: dict[str, Any],
    extras: dict[str, Tensor] | None = None,
    record: dict[str, Any] | None = None,
) -> None:
    """Commit a partly calibrated (or reconstructed) model as one file: its state, ``extras``
    tensors, and in the header the fingerprint, the steps done and a JSON ``record``."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state |= {EXTRAS_PREFIX + k: v.detach().contiguous() for k, v in (extras or {}).items()}
    meta = {"done_blocks": done_blocks} | fingerprint | {"record": record or {}}
    write_progress(directory, state, meta)


def write_progress(directory: str | Path, state: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Commit ``state`` (model tensors and ``EXTRAS_PREFIX`` ones) with its JSON ``meta`` as
    one file, atomically (the primitive under :func:`save_progress`, for tools that merge or
    edit progress)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = meta | {"format_version": PROGRESS_FORMAT}
    header = {_HEADER_KEY: json.dumps(meta, sort_keys=True)}
    path = directory / PROGRESS_WEIGHTS
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=header))


def has_progress(directory: str | Path) -> bool:
    return (Path(directory) / PROGRESS_WEIGHTS).is_file()


def read_progress_meta(directory: str | Path) -> dict[str, Any]:
    """The JSON record of :func:`save_progress` (``done_blocks``, fingerprint, ``record``)."""
    path = Path(directory) / PROGRESS_WEIGHTS
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        meta = json.loads(header[_HEADER_KEY])
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(f"{path}: unreadable or not adalog progress ({exc})") from exc
    if meta.get("format_version") != PROGRESS_FORMAT:
        raise ConfigError(
            f"{path}: progress format {meta.get('format_version')!r} is not supported by adalog "
            f"{__version__} (expects {PROGRESS_FORMAT}); use a fresh folder"
        )
    return meta


def load_progress(
    model: nn.Module, directory: str | Path, fingerprint: dict[str, Any]
) -> list[str]:
    """Restore the state saved by :func:`save_progress` and return the steps done (none if
    ``directory`` holds no progress). Progress of another run is refused, naming what
    differs: resuming it would mix two runs."""
    if not has_progress(directory):
        return []
    meta = read_progress_meta(directory)
    check_fingerprint(meta, fingerprint, Path(directory) / PROGRESS_WEIGHTS)
    state = read_progress_state(directory)
    _adopt_shapes(model, state)
    try:
        load_weights(model, state)
    except WeightsError as exc:
        raise ConfigError(f"{directory}: progress does not match the model: {exc}") from exc
    return list(meta["done_blocks"])


def read_progress_state(directory: str | Path) -> dict[str, Tensor]:
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


def ensure_fold_biases(model: nn.Module, state: dict) -> None:
    """Give bias-free linears the bias a LayerNorm fold created (Swin reduction, §10.15), so a
    saved state loads strictly."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear) and module.bias is None and f"{name}.bias" in state:
            module.ensure_bias()


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


def state_dtype(state: dict[str, Tensor]) -> torch.dtype:
    """The float dtype of a model state (float32 if it holds no float tensor)."""
    return next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
