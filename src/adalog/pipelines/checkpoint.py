"""Save and load quantized models: ``model.safetensors`` (folded weights, quantizer state,
AdaLog q and tables) plus ``adalog.json`` (model name, constructor kwargs, config, version)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from adalog._version import __version__
from adalog.config import AdaLogConfig
from adalog.errors import ConfigError, WeightsError
from adalog.io import atomic_write, atomic_write_json
from adalog.models import create_model, load_weights, read_state_dict
from adalog.models.qmodules import set_quant_mode
from adalog.models.wrap import wrap_model
from adalog.pipelines.runstore import ensure_fold_biases, state_dtype

FORMAT_VERSION = 1
META_FILE = "adalog.json"
WEIGHTS_FILE = "model.safetensors"


def save_quantized(model: nn.Module, out_dir: str | Path) -> Path:
    """Write a calibrated model (see :func:`adalog.pipelines.calibrate.calibrate`)."""
    meta = getattr(model, "adalog_meta", None)
    if meta is None:
        raise ConfigError("model was not quantized by adalog (no adalog_meta); nothing to save")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dtype = state_dtype(state)
    atomic_write(out_dir / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp)))
    meta = meta | {"dtype": str(dtype).removeprefix("torch."), "format_version": FORMAT_VERSION}
    atomic_write_json(out_dir / META_FILE, meta)
    return out_dir


def check_output_folder(out_dir: str | Path) -> Path:
    """Make sure a checkpoint can be written to ``out_dir`` before any long work starts: not a
    file, not a folder of other files (an earlier checkpoint there is replaced), writable."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} is a file, not a folder")
    ours = {META_FILE, WEIGHTS_FILE, "calibrated"}
    if out_dir.is_dir():
        foreign = sorted(p.name for p in out_dir.iterdir() if p.name not in ours)
        if foreign:
            raise ConfigError(
                f"--out {out_dir} holds other files ({', '.join(foreign[:5])}); pick an empty or "
                "new folder, or an earlier adalog checkpoint to replace"
            )
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(out_dir / ".write-check", lambda tmp: tmp.write_bytes(b""))
        (out_dir / ".write-check").unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write to --out {out_dir}: {exc}") from exc
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
    apply_data_config(model, meta.get("data_config"))
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


def quantization_meta(
    identity: dict[str, Any],
    config: AdaLogConfig,
    data_config: dict[str, Any],
    calibration: dict[str, Any],
) -> dict[str, Any]:
    """What a checkpoint records beside its tensors: the model identity (full timm name with
    pretrained tag, constructor kwargs, starting-weights digest), the config, the preprocessing
    the model was calibrated for and the calibration images."""
    return {
        "adalog_version": __version__,
        "model": identity["model"],
        "model_kwargs": identity["model_kwargs"],
        "weights_sha256": identity["weights_sha256"],
        "config": config.to_dict(),
        "bits": {"w": config.w_bits, "a": config.a_bits, "s": config.s_bits},
        "data_config": json.loads(json.dumps(data_config)),
        "calibration": calibration,
    }


def apply_data_config(model: nn.Module, data_config: dict[str, Any] | None) -> None:
    """Give ``model`` the preprocessing recorded in its checkpoint (mean, std, crop, size), so
    evaluation transforms images as calibration did whatever timm's defaults are today."""
    if not data_config:
        return
    restored = {k: tuple(v) if isinstance(v, list) else v for k, v in data_config.items()}
    model.pretrained_cfg = dict(getattr(model, "pretrained_cfg", None) or {}) | restored
