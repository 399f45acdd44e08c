"""Per-head value rotation: an exact float transform of timm attention, applied before
calibration (an option beyond the reference, ``AdaLogConfig.rotate_values``).

For an orthogonal ``Q_h`` per head, ``softmax(q kᵀ)·(v_h Q_h) = (softmax(q kᵀ)·v_h) Q_h``, and the
output projection undoes it with its input columns ``W_proj[:, h] Q_h``: the FP model is unchanged
up to float rounding and costs nothing at run time, but the quantized operands change. The v
operand of attn·v and the proj input are rotated within each head, which spreads the large
channels of the attention output over the head's channels and lowers the 4-bit proj error
(RESULTS.md, "Rotating the attention values").
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import WindowAttention
from timm.models.vision_transformer import Attention
from torch import Tensor, nn


def random_orthogonal(size: int, seed: int) -> Tensor:
    """A seeded Haar-random orthogonal matrix (float64): QR of a Gaussian, signs fixed by R's
    diagonal."""
    generator = torch.Generator(device="cpu").manual_seed(seed)  # one matrix on every device
    gaussian = torch.randn(size, size, generator=generator, dtype=torch.float64, device="cpu")
    q, r = torch.linalg.qr(gaussian)
    return q * r.diagonal().sign()


def rotate_value_heads(model: nn.Module) -> int:
    """Rotate every timm ``Attention`` / ``WindowAttention`` of ``model`` in place; return how
    many were rotated. The matrices are fixed: head ``h`` of the ``i``-th attention module (in
    module order) uses ``random_orthogonal(head_dim, 1000·i + h)``."""
    attentions = [m for m in model.modules() if isinstance(m, (Attention, WindowAttention))]
    for index, attention in enumerate(attentions):
        _rotate(attention, seed=1000 * index)
    return len(attentions)


@torch.no_grad()
def _rotate(attention: nn.Module, seed: int) -> None:
    qkv, proj, heads = attention.qkv, attention.proj, attention.num_heads
    width = proj.in_features  # heads x head_dim, the width of q, k and v each
    if qkv.out_features != 3 * width or width % heads:
        raise ValueError(f"unexpected attention shapes: qkv {qkv.out_features}, proj {width}")
    head_dim = width // heads
    for head in range(heads):
        rotation = random_orthogonal(head_dim, seed + head).to(qkv.weight)
        rows = slice(2 * width + head * head_dim, 2 * width + (head + 1) * head_dim)
        cols = slice(head * head_dim, (head + 1) * head_dim)
        # v_h Q = x (Qᵀ W_v)ᵀ + Qᵀ b_v: the value rows mix; proj reads (attn·v_h Q) with W Q
        qkv.weight[rows] = rotation.T @ qkv.weight[rows]
        if qkv.bias is not None:
            qkv.bias[rows] = rotation.T @ qkv.bias[rows]
        proj.weight[:, cols] = proj.weight[:, cols] @ rotation
