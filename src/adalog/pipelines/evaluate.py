"""Top-1 / top-5 evaluation of a classifier on a labelled image folder."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from adalog.data import LabeledImageFolder, collate_skipping_bad, eval_transform, scan_image_folder
from adalog.devices import resolve_device
from adalog.distributed import Ranks, max_across, shard, sum_across
from adalog.errors import DataError


@dataclass
class EvalResult:
    """Accuracy plus timing: ``seconds`` is the wall time of the whole loop (data loading
    included); ``extra["images_per_s"]`` counts only the model's forward passes."""

    top1: float
    top5: float
    n: int
    model: str
    skipped_images: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out.update(out.pop("extra"))
        return out


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def build_eval_loader(
    model: nn.Module,
    data: str | Path,
    include: str | Path | None = None,
    exclude: str | Path | None = None,
    label_map: str | Path | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    skip_bad_images: bool = False,
    ranks: Ranks | None = None,
) -> DataLoader:
    """A loader over the labelled images of ``data``; with ``ranks`` of several processes, only
    this rank's shard of them (:func:`adalog.distributed.shard`)."""
    records = scan_image_folder(data, label_map=label_map, include=include, exclude=exclude)
    if ranks is not None and ranks.active:
        records = [records[i] for i in shard(len(records), ranks)]
    dataset = LabeledImageFolder(records, eval_transform(model), skip_bad_images)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=default_workers() if workers is None else workers,
        collate_fn=collate_skipping_bad,
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    device: str | torch.device = "auto",
    name: str | None = None,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
    ranks: Ranks | None = None,
) -> EvalResult:
    """Run ``model`` over ``loader``; count top-1 and top-5 hits.

    With ``ranks`` of several processes (each ``loader`` over its shard), the counts are summed
    over the ranks, so every rank returns the whole set's result, equal to one process's; the
    times are the slowest rank's and ``images_per_s`` is the job's.

    ``dtype`` float64 takes float32 rounding out of the comparison of two computations of one
    low-bit model (e.g. fake-quant vs integer runtime), whose codes it can otherwise flip.
    """
    ranks = ranks or Ranks()
    device = resolve_device(device)
    model = model.eval().to(device, dtype)
    name = name or getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
    hits1 = hits5 = seen = skipped = 0
    forward_seconds = 0.0
    start = time.perf_counter()
    bar = tqdm(loader, desc=f"eval {name}", unit="batch", disable=not progress or not ranks.is_main)
    for images, labels, n_bad in bar:
        skipped += n_bad
        if labels.numel() == 0:
            continue
        tick = time.perf_counter()
        logits = model(images.to(device, dtype))
        top5 = logits.topk(min(5, logits.shape[-1]), dim=-1).indices.cpu()  # syncs a GPU
        forward_seconds += time.perf_counter() - tick
        hits1 += (top5[:, 0] == labels).sum().item()
        hits5 += (top5 == labels[:, None]).any(dim=-1).sum().item()
        seen += labels.numel()
        bar.set_postfix(top1=f"{hits1 / seen:.4f}")
    hits1, hits5, seen, skipped = sum_across([hits1, hits5, seen, skipped], ranks)
    seconds, forward_seconds = max_across([time.perf_counter() - start, forward_seconds], ranks)
    if seen == 0:
        raise DataError(f"no image could be evaluated ({skipped} unreadable images skipped)")
    return EvalResult(
        top1=hits1 / seen,
        top5=hits5 / seen,
        n=seen,
        model=name,
        skipped_images=skipped,
        seconds=seconds,
        extra={
            "device": str(device),
            "batch_size": loader.batch_size,
            "images_per_s": seen / forward_seconds if forward_seconds > 0 else None,
            "threads": torch.get_num_threads(),
            "ranks": ranks.world_size,
            "dtype": str(dtype).removeprefix("torch."),
        },
    )
