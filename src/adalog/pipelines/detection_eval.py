"""COCO box and mask AP of a detector (FP or quantized) on a COCO-format image set."""

from __future__ import annotations

import contextlib
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from adalog.data.coco import CocoInstances
from adalog.devices import resolve_device

#: COCOeval's first three summary numbers: AP over IoU 0.5:0.95, at 0.5, at 0.75
_SUMMARY = ("AP", "AP50", "AP75")
MASK_THRESHOLD = 0.5  # a pasted mask probability counts as foreground from here (§7)


def evaluate_detector(
    model: nn.Module,
    images_root: str | Path,
    annotation_file: str | Path,
    limit: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, the same for ``segm``, ``n_images`` and timing.

    The set is checked before the model runs (:class:`adalog.data.coco.CocoInstances`); images
    go through the model one at a time at their own size.
    """
    data = CocoInstances(images_root, annotation_file, model.adalog_detector_spec.classes, limit)
    if device is not None:
        model.to(resolve_device(device))
    target = next(model.parameters()).device
    model.eval()
    boxes: list[dict] = []
    masks: list[dict] = []
    start, model_seconds = time.perf_counter(), 0.0
    for index in tqdm(range(len(data)), desc="detect", unit="image", disable=not progress):
        image = data.image(index).to(target)
        tic = time.perf_counter()
        with torch.no_grad():
            (output,) = model([image])
        model_seconds += time.perf_counter() - tic
        image_id = data.image_ids[index]
        found = coco_results(image_id, output, data.category_of_label)
        boxes.extend(found[0])
        masks.extend(found[1])
    metrics = {"n_images": len(data)}
    for kind, results in (("bbox", boxes), ("segm", masks)):
        summary = coco_summary(data.coco, results, kind, data.image_ids)
        metrics.update(
            {f"{kind}_{name}": value for name, value in zip(_SUMMARY, summary, strict=True)}
        )
    metrics["seconds"] = time.perf_counter() - start
    metrics["images_per_s"] = len(data) / model_seconds if model_seconds else None
    return metrics


def coco_results(
    image_id: int, output: dict[str, Tensor], category_of_label: dict[int, int]
) -> tuple[list[dict], list[dict]]:
    """A detector's output for one image as COCO result entries: boxes ``[x, y, w, h]``, and
    masks thresholded at :data:`MASK_THRESHOLD` as RLE, each with its box's score."""
    from pycocotools import mask as mask_utils

    xyxy = output["boxes"].detach().cpu().double()
    xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1).tolist()
    scores = output["scores"].detach().cpu().tolist()
    categories = [category_of_label[int(label)] for label in output["labels"].tolist()]
    boxes = [
        {"image_id": image_id, "category_id": c, "bbox": b, "score": s}
        for b, c, s in zip(xywh, categories, scores, strict=True)
    ]
    masks = []
    if "masks" in output and len(categories):
        binary = (output["masks"][:, 0] >= MASK_THRESHOLD).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
        for rle, c, s in zip(rles, categories, scores, strict=True):
            rle["counts"] = rle["counts"].decode("ascii")
            masks.append({"image_id": image_id, "category_id": c, "segmentation": rle, "score": s})
    return boxes, masks


def coco_summary(coco, results: list[dict], kind: str, image_ids: list[int]) -> list[float]:
    """AP, AP50, AP75 of ``results`` (``kind`` ``bbox`` or ``segm``) on ``image_ids``; no
    detection at all scores 0."""
    from pycocotools.cocoeval import COCOeval

    if not results:
        return [0.0] * len(_SUMMARY)
    with contextlib.redirect_stdout(io.StringIO()):
        detections = coco.loadRes(results)
        evaluation = COCOeval(coco, detections, kind)
        evaluation.params.imgIds = list(image_ids)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return [max(float(v), 0.0) for v in evaluation.stats[: len(_SUMMARY)]]
