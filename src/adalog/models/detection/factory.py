"""Detectors by name, with weights from a local file or the public release, loaded strictly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torchvision.models.detection import MaskRCNN

from adalog.errors import ConfigError, WeightsError
from adalog.models.detection.checkpoint import load_mmdet_checkpoint
from adalog.models.detection.mask_rcnn import DetectorSpec, build_detector, detector_spec
from adalog.models.weights import load_weights, read_state_dict


def create_detector(
    name: str, weights: str | Path | None = None, pretrained: bool = True, **overrides
) -> MaskRCNN:
    """Detector ``name`` in eval mode; ``overrides`` replace fields of its spec (recorded, so a
    checkpoint rebuilds the same architecture).

    ``weights`` is a release checkpoint (mmdetection layout, converted) or a state dict of this
    build (e.g. the trained proxy); without it, ``pretrained`` downloads the spec's release.
    """
    spec = _with_overrides(detector_spec(name), overrides)
    model = build_detector(spec, name)
    if weights is None and pretrained:
        weights = _download(name, spec)
    if weights is not None:
        state = read_state_dict(weights)
        if any(key.startswith("backbone.body.") for key in state):
            load_weights(model, state)
        else:
            load_mmdet_checkpoint(model, state)
    model.adalog_model_kwargs = dict(overrides)
    return model.eval()


def _with_overrides(spec: DetectorSpec, overrides: dict) -> DetectorSpec:
    known = set(DetectorSpec.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ConfigError(
            f"unknown detector setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
    return replace(spec, **values)


def _download(name: str, spec: DetectorSpec) -> Path:
    if spec.url is None:
        raise WeightsError(f"detector '{name}' has no published weights; pass --weights FILE")
    target = Path(torch.hub.get_dir()) / "checkpoints" / spec.url.rsplit("/", 1)[1]
    if not target.is_file():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(spec.url, str(target))
        except OSError as exc:
            raise WeightsError(
                f"could not download the weights of '{name}' from {spec.url} ({exc}). "
                "Offline? Pass a local checkpoint with --weights (Python: weights=...)."
            ) from exc
    return target
