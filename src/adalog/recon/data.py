"""Reconstruction data: seeded views of the calibration images and per-block captured tensors.

The reference reconstructs on 1024 further training images (§7.2); here only the calibration
images are available, so the set is built from them: every image once as given, then random
resized crops (area ``[crop_scale_min, 1]``, aspect ``[3/4, 4/3]``) with optional horizontal
flips, cycling through the images, all drawn from one seeded generator. With ``mix_prob > 0``
(beyond the reference) each crop, with that probability, gets a rectangle (a quarter to three
quarters of its area) pasted from a crop of another calibration image (CutMix without labels:
the targets are the FP model's own outputs), so the few images yield more varied activations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adalog.devices import model_device
from adalog.errors import DataError
from adalog.models.hooks import StopForward, run_forward


def augmented_views(
    images: Tensor,
    size: int,
    crop_scale_min: float,
    hflip: bool,
    seed: int,
    mix_prob: float = 0.0,
) -> Tensor:
    """``size`` images of the shape of ``images``: the originals first, then seeded crops, a
    ``mix_prob`` share of them mixed with a crop of another image. ``mix_prob=0`` makes no
    extra random draws, so its views are those of versions without the option."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise DataError(f"images must be a non-empty (N, C, H, W) batch, got {tuple(images.shape)}")
    n = images.shape[0]
    if size <= n:
        return images[:size].clone()
    g = torch.Generator(device="cpu").manual_seed(seed)  # the same views on every device
    views = [images]
    for i in range(n, size):
        view = _random_view(images[i % n], crop_scale_min, hflip, g)
        if mix_prob > 0 and n > 1 and _uniform(g, 0.0, 1.0) < mix_prob:
            other = (i + int(torch.randint(1, n, (1,), generator=g, device=g.device))) % n
            patch = _random_view(images[other], crop_scale_min, hflip, g)
            view = _paste_box(view, patch, g)
        views.append(view[None])
    return torch.cat(views)


def _paste_box(view: Tensor, patch: Tensor, g: torch.Generator) -> Tensor:
    """``view`` with a random rectangle of ``patch`` (same place), a quarter to three quarters
    of the area, pasted in."""
    _, height, width = view.shape
    top, left, h, w = _random_box(height, width, 0.25, 0.75, g)
    mixed = view.clone()
    mixed[:, top : top + h, left : left + w] = patch[:, top : top + h, left : left + w]
    return mixed


def _random_view(image: Tensor, crop_scale_min: float, hflip: bool, g: torch.Generator) -> Tensor:
    _, height, width = image.shape
    top, left, h, w = _random_box(height, width, crop_scale_min, 1.0, g)
    crop = image[None, :, top : top + h, left : left + w]
    view = F.interpolate(crop, size=(height, width), mode="bilinear", align_corners=False)[0]
    if hflip and _uniform(g, 0.0, 1.0) < 0.5:
        view = view.flip(-1)
    return view


def _random_box(
    height: int, width: int, area_lo: float, area_hi: float, g: torch.Generator
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random rectangle inside ``height x width``: area fraction
    uniform in ``[area_lo, area_hi]``, aspect ratio log-uniform in ``[3/4, 4/3]``."""
    area = height * width * _uniform(g, area_lo, area_hi)
    ratio = math.exp(_uniform(g, math.log(3 / 4), math.log(4 / 3)))
    w = min(width, max(1, round(math.sqrt(area * ratio))))
    h = min(height, max(1, round(math.sqrt(area / ratio))))
    top = int(torch.randint(0, height - h + 1, (1,), generator=g, device=g.device))
    left = int(torch.randint(0, width - w + 1, (1,), generator=g, device=g.device))
    return top, left, h, w


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g, device=g.device))


@dataclass
class BlockData:
    """What one block is trained on: ``inputs`` fed to the quantized block, FP ``targets``,
    the FP inputs (kept only to mix them in under QDrop) and optional Fisher ``weights``."""

    inputs: Tensor
    targets: Tensor
    fp_inputs: Tensor | None = None
    weights: Tensor | None = None

    def __len__(self) -> int:
        return self.inputs.shape[0]


def capture_fp(
    fp_model: nn.Module,
    block_name: str,
    data: Tensor,
    batch_size: int,
    fisher: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """FP inputs and outputs of ``block_name``; with ``fisher`` (logits → scalar loss), also the
    squared gradients of that loss with respect to the block outputs."""
    block = fp_model.get_submodule(block_name)
    device = next(fp_model.parameters()).device
    xs, ys, grads = [], [], []
    leaf: list[Tensor] = []

    def hook(module, inputs, output):
        xs.append(inputs[0].detach())
        ys.append(output.detach())
        if fisher is None:
            raise StopForward
        leaf.append(output.detach().requires_grad_(True))
        return leaf[-1]

    handle = block.register_forward_hook(hook)
    try:
        for start in range(0, data.shape[0], batch_size):
            batch = data[start : start + batch_size].to(device)
            if fisher is None:
                with torch.no_grad():
                    run_forward(fp_model, batch)
                continue
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(fisher(fp_model(batch)), leaf.pop())
            grads.append(grad.square())
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(ys), torch.cat(grads) if grads else None


def run_in_batches(module: nn.Module, inputs: Tensor, batch_size: int) -> Tensor:
    """``module`` applied to ``inputs`` in the same ``batch_size`` chunks as the captures (so
    the same GEMM shapes), without autograd."""
    with torch.no_grad():
        chunks = [module(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    return torch.cat(chunks)


def capture_inputs(model: nn.Module, block_name: str, data: Tensor, batch_size: int) -> Tensor:
    """Inputs of ``block_name`` when ``model`` runs as it is (e.g. in quant mode)."""
    block = model.get_submodule(block_name)
    device = model_device(model)
    xs = []

    def pre_hook(module, inputs):
        xs.append(inputs[0].detach())
        raise StopForward

    handle = block.register_forward_pre_hook(pre_hook)
    try:
        with torch.no_grad():
            for start in range(0, data.shape[0], batch_size):
                run_forward(model, data[start : start + batch_size].to(device))
    finally:
        handle.remove()
    return torch.cat(xs)
