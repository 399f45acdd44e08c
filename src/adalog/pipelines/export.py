"""Integer export of a quantized model (issue: integer export and real low-bit inference).

An artifact is a folder with two files:

* ``artifact.safetensors``: every quantized weight as packed integer codes
  (``<layer>.weight.codes``, see :mod:`adalog.quant.packing`), plus every other tensor of the
  quantized model's state dict under its own name: per-row weight scales and zero points
  (``<layer>.weight_quant.scale``/``zero_point``), every activation quantizer's parameters,
  AdaLog's ``q``, shift amounts ``t1`` and integer LUT numerators ``lut_numerators`` (= D·T2),
  biases, LayerNorm affines, embeddings. The FP32 weights themselves are not stored.
* ``artifact.json``: the schema below, versioned (``format``/``format_version``).

``artifact.json``::

    {"format": "adalog-artifact", "format_version": 1, "adalog_version": str,
     "model": str, "model_kwargs": {...}, "config": {...AdaLogConfig...}, "bits": {w, a, s},
     "layers": {<layer>: {"type": "linear" | "conv2d", "weight_shape": [...], "w_bits": int,
                          "codes_bytes": int, "input": <quantizer> | null}},
     "matmuls": {<module>: {"a": <quantizer>, "b": <quantizer>}},
     "size_bytes": {"artifact": int, "fp32_weights": int}}

    <quantizer> = {"type": "uniform", "bits": int, "shape": [...]}            # scale, zero_point
                | {"type": "twin", "bits": int}                               # s_pos, s_neg
                | {"type": "log2" | "logsqrt2" | "adalog", "bits": int, "shift": float,
                   "shift_folded": bool, "q": int | null, "denominator": int | null}
                | {"type": "identity"}

Weight code ``k`` of row ``o`` dequantizes to ``(k - zero_point[o]) · scale[o]``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from adalog._version import __version__
from adalog.config import AdaLogConfig
from adalog.errors import ArtifactError, ConfigError, WeightsError
from adalog.io import atomic_write, atomic_write_json
from adalog.models import create_model, load_weights
from adalog.models.detection import is_detector
from adalog.models.qmodules import QuantConv2d, QuantLinear, QuantMatMul, set_quant_mode
from adalog.models.wrap import wrap_model
from adalog.pipelines.checkpoint import load_quantized
from adalog.quant import LogQuantizer, TwinUniformQuantizer, UniformQuantizer
from adalog.quant.log import adalog_denominator, adalog_lut_numerators
from adalog.quant.packing import pack_codes, packed_size, unpack_codes

ARTIFACT_FORMAT = "adalog-artifact"
ARTIFACT_VERSION = 1
TENSORS_FILE = "artifact.safetensors"
META_FILE = "artifact.json"


@dataclass
class Artifact:
    meta: dict[str, Any]
    tensors: dict[str, Tensor]


def _quantizer_schema(quant: nn.Module | None, prefix: str, extra: dict[str, Tensor]) -> dict:
    if quant is None or getattr(quant, "is_identity", False):
        return {"type": "identity"}
    if isinstance(quant, UniformQuantizer):
        return {"type": "uniform", "bits": quant.n_bits, "shape": list(quant.scale.shape)}
    if isinstance(quant, TwinUniformQuantizer):
        return {"type": "twin", "bits": quant.n_bits}
    if isinstance(quant, LogQuantizer):
        schema = {
            "type": quant.kind,
            "bits": quant.n_bits,
            "shift": float(quant.shift),
            "shift_folded": bool(quant.shift_folded),
            "q": None,
            "denominator": None,
        }
        if quant.kind == "adalog":
            schema["q"] = int(quant.q)
            schema["denominator"] = adalog_denominator(quant.n_bits)
            numerators = adalog_lut_numerators(quant.q, quant.n_bits).to(torch.int32)
            extra[f"{prefix}.lut_numerators"] = numerators
        return schema
    raise ArtifactError(f"{prefix}: cannot export a {type(quant).__name__}")


def build_artifact(model: nn.Module) -> Artifact:
    """Packed codes and schema of a quantized model (from :func:`load_quantized`)."""
    meta_q = getattr(model, "adalog_meta", None)
    if meta_q is None:
        raise ArtifactError("model was not quantized by adalog (no adalog_meta)")
    state = {k: v.detach() for k, v in model.state_dict().items()}
    tensors: dict[str, Tensor] = {}
    layers: dict[str, Any] = {}
    matmuls: dict[str, Any] = {}
    fp32_weight_bytes = 0
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantConv2d)):
            codes = module.weight_quant.quantize(module.weight.detach())
            packed = pack_codes(codes, module.weight_quant.n_bits)
            tensors[f"{name}.weight.codes"] = packed
            del state[f"{name}.weight"]
            fp32_weight_bytes += module.weight.numel() * 4
            layers[name] = {
                "type": "linear" if isinstance(module, QuantLinear) else "conv2d",
                "weight_shape": list(module.weight.shape),
                "w_bits": module.weight_quant.n_bits,
                "codes_bytes": packed.numel(),
                "input": _quantizer_schema(module.input_quant, f"{name}.input_quant", tensors),
            }
        elif isinstance(module, QuantMatMul):
            matmuls[name] = {
                "a": _quantizer_schema(module.a_quant, f"{name}.a_quant", tensors),
                "b": _quantizer_schema(module.b_quant, f"{name}.b_quant", tensors),
            }
    tensors.update({k: v.contiguous() for k, v in state.items()})
    meta = {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_VERSION,
        "adalog_version": __version__,
        "model": meta_q["model"],
        "model_kwargs": meta_q.get("model_kwargs", {}),
        "config": meta_q["config"],
        "bits": meta_q["bits"],
        "layers": layers,
        "matmuls": matmuls,
        "size_bytes": {"fp32_weights": fp32_weight_bytes},
    }
    return Artifact(meta, tensors)


def export_artifact(qdir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """``adalog export``: write the artifact of checkpoint ``qdir``; return its meta."""
    model = load_quantized(qdir, dtype=torch.float32)  # float32 scales
    if is_detector(model):
        raise ConfigError(f"{qdir} holds a detector; the integer export covers classifiers only")
    artifact = build_artifact(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = atomic_write(out_dir / TENSORS_FILE, lambda tmp: save_file(artifact.tensors, str(tmp)))
    artifact.meta["size_bytes"]["artifact"] = path.stat().st_size
    atomic_write_json(out_dir / META_FILE, artifact.meta)
    return artifact.meta


def read_artifact(art_dir: str | Path) -> Artifact:
    """Read and validate an artifact; raise :class:`ArtifactError` naming what is wrong."""
    art_dir = Path(art_dir)
    meta_path, tensors_path = art_dir / META_FILE, art_dir / TENSORS_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{meta_path}: not a readable artifact schema ({exc})") from exc
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != ARTIFACT_FORMAT:
        raise ArtifactError(f"{meta_path}: not an adalog artifact (format {found!r})")
    if meta.get("format_version") != ARTIFACT_VERSION:
        raise ArtifactError(
            f"{meta_path}: artifact format version {meta.get('format_version')!r} is not "
            f"supported by adalog {__version__} (expects {ARTIFACT_VERSION}); re-export it"
        )
    missing_keys = [k for k in ("model", "config", "layers", "matmuls") if k not in meta]
    if missing_keys:
        raise ArtifactError(f"{meta_path}: schema lacks {missing_keys}")
    try:
        tensors = load_file(str(tensors_path))
    except (OSError, SafetensorError) as exc:
        raise ArtifactError(f"{tensors_path}: corrupt or unreadable ({exc})") from exc
    _check_layers(meta, tensors, tensors_path)
    return Artifact(meta, tensors)


def _check_layers(meta: dict, tensors: dict[str, Tensor], path: Path) -> None:
    problems = []
    for name, layer in meta["layers"].items():
        codes = tensors.get(f"{name}.weight.codes")
        expected = packed_size(math.prod(layer["weight_shape"]), layer["w_bits"])
        if codes is None:
            problems.append(f"{name}.weight.codes missing")
        elif codes.dtype != torch.uint8 or codes.numel() != expected:
            problems.append(f"{name}.weight.codes has {codes.numel()} bytes, expected {expected}")
        for buffer in ("scale", "zero_point"):
            if f"{name}.weight_quant.{buffer}" not in tensors:
                problems.append(f"{name}.weight_quant.{buffer} missing")
    if problems:
        shown = "; ".join(problems[:8]) + (
            f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        )
        raise ArtifactError(f"{path}: does not match its schema: {shown}")


def dequantized_weight(artifact: Artifact, layer: str) -> Tensor:
    """``(codes - zero_point) · scale`` of one layer, in its weight shape."""
    info = artifact.meta["layers"][layer]
    shape = info["weight_shape"]
    codes = unpack_codes(
        artifact.tensors[f"{layer}.weight.codes"], info["w_bits"], math.prod(shape)
    )
    scale = artifact.tensors[f"{layer}.weight_quant.scale"]
    zero_point = torch.round(artifact.tensors[f"{layer}.weight_quant.zero_point"])
    rows = codes.reshape(shape[0], -1).to(scale.dtype)
    return ((rows - zero_point.reshape(shape[0], 1)) * scale.reshape(shape[0], 1)).reshape(shape)


def fake_quant_model(artifact: Artifact) -> nn.Module:
    """The fake-quantized model an artifact encodes (weights rebuilt from their codes)."""
    meta = artifact.meta
    model = create_model(meta["model"], pretrained=False, **meta.get("model_kwargs", {}))
    wrap_model(model, AdaLogConfig.from_dict(meta["config"]), calibrating=False)
    skip = {k for k in artifact.tensors if k.endswith((".weight.codes", ".lut_numerators"))}
    state = {k: v for k, v in artifact.tensors.items() if k not in skip}
    for name in meta["layers"]:
        state[f"{name}.weight"] = dequantized_weight(artifact, name)
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear) and module.bias is None and f"{name}.bias" in state:
            module.ensure_bias()
    try:
        load_weights(model, state)
    except WeightsError as exc:
        raise ArtifactError(f"artifact does not match model {meta['model']}: {exc}") from exc
    model.adalog_meta = {k: meta[k] for k in ("model", "model_kwargs", "config", "bits")}
    set_quant_mode(model, True)
    return model.eval()
