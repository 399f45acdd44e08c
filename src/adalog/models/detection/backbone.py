"""The Swin backbone of the public Swin detection checkpoints, as timm modules plus an FPN.

timm's Swin differs from the detection releases in three ways that change numbers
(../shared/detection/SWIN_DETECTION.md §10e), each handled here:

* a block rolls then pads; the releases pad to a multiple of the window, then roll, and mask on
  the padded map: :class:`PadFirstSwinBlock` (instances get their class swapped, so the
  parameter names and the quantization wrappers stay timm's);
* timm shrinks the window and drops the shift on maps no larger than a window: built with
  ``always_partition``;
* the releases normalise each stage output with its own LayerNorm (``norm0..3``) and have no
  final norm: :attr:`SwinFPN.out_norms`, and timm's ``norm`` is removed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    window_partition,
    window_reverse,
)
from torch import Tensor, nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool


class PadFirstSwinBlock(SwinTransformerBlock):
    """A Swin block that zero-pads its map to whole windows before the cyclic shift, and builds
    the shift mask on the padded map (padded tokens are attended to, not masked)."""

    def _attn(self, x: Tensor) -> Tensor:
        _, height, width, channels = x.shape
        win_h, win_w = self.window_size
        x = F.pad(x, (0, 0, 0, (-width) % win_w, 0, (-height) % win_h))
        padded_h, padded_w = x.shape[1:3]
        shift = self.shift_size
        mask = None
        if any(shift):
            x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
            mask = self.get_attn_mask(x)
        windows = window_partition(x, self.window_size).view(-1, self.window_area, channels)
        windows = self.attn(windows, mask=mask).view(-1, win_h, win_w, channels)
        x = window_reverse(windows, self.window_size, padded_h, padded_w)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2))
        return x[:, :height, :width].contiguous()


class SwinFPN(nn.Module):
    """Swin stages (``body``), a LayerNorm on each stage output, and torchvision's FPN with a
    max-pooled extra level: the maps ``'0'..'3'`` (strides 4-32) and ``'pool'`` (stride 64)."""

    def __init__(
        self,
        embed_dim: int,
        depths: Sequence[int],
        num_heads: Sequence[int],
        window_size: int = 7,
        out_channels: int = 256,
    ) -> None:
        super().__init__()
        self.body = SwinTransformer(
            img_size=224,
            patch_size=4,
            embed_dim=embed_dim,
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            window_size=window_size,
            num_classes=0,
            strict_img_size=False,
            always_partition=True,
        )
        self.body.norm = nn.Identity()
        for module in self.body.modules():
            if type(module) is SwinTransformerBlock:
                module.__class__ = PadFirstSwinBlock
        dims = [embed_dim * 2**i for i in range(len(depths))]
        self.out_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.fpn = FeaturePyramidNetwork(dims, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def stage_outputs(self, images: Tensor) -> list[Tensor]:
        """Each stage's normalised output, NCHW."""
        x = self.body.patch_embed(images)
        outputs = []
        for stage, norm in zip(self.body.layers, self.out_norms, strict=True):
            x = stage(x)
            outputs.append(norm(x).permute(0, 3, 1, 2).contiguous())
        return outputs

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        levels = OrderedDict((str(i), x) for i, x in enumerate(self.stage_outputs(images)))
        return self.fpn(levels)
