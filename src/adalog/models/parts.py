"""The part each module of a supported model family plays, known in one place.

Wrapping (which quantizer a linear gets, which LayerNorm folds into it, the order a block runs
its modules in), reconstruction (its units, which of them end in the logits), the ablation's
partial searches, the plots and the fast runtime's LayerNorm fusion ask a family's
:class:`FamilyParts` instead of testing name suffixes of their own. A new family (a detection
backbone) adds one entry to :data:`FAMILIES`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from timm.layers import PatchEmbed
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from adalog.models.factory import model_family

QKV = "qkv"
MATMUL_QK = "matmul_qk"  # q·kᵀ
MATMUL_AV = "matmul_av"  # post-Softmax probabilities · v
PROJ = "proj"
FC1 = "fc1"
FC2 = "fc2"  # its input is post-GELU
REDUCTION = "reduction"  # Swin patch merging's linear
HEAD = "head"
PATCH_EMBED = "patch_embed"  # the conv that reads the image


@dataclass(frozen=True)
class FamilyParts:
    """Where a family keeps each part.

    ``paths`` maps a part to its dotted path inside the module that owns it (a block, an
    attention's owner, a patch merging); ``folds`` maps a part whose input is a LayerNorm's
    output to that LayerNorm's path inside the same owner (§3). ``heads`` are the top-level
    classifier modules, ``units`` the module types reconstructed one at a time besides the
    heads (§7.1), ``order`` the order a block runs its parts in.
    """

    paths: Mapping[str, str]
    folds: Mapping[str, str]
    heads: tuple[str, ...]
    units: tuple[type[nn.Module], ...]
    order: tuple[str, ...]
    #: containers whose children are blocks (``blocks.3``), and modules that are blocks
    #: by their own name (Swin's ``downsample``)
    block_lists: tuple[str, ...] = ("blocks",)
    block_names: tuple[str, ...] = ()
    #: the heads reconstructed as units (distilled DeiT's ``head_dist`` is quantized as a head
    #: but not reconstructed on its own: a ``kl_tail`` unit merges only ``head``)
    unit_heads: tuple[str, ...] = ("head",)
    #: whether conv inputs are quantized (at the activation bits, the image at ``image_bits``);
    #: the classification protocol keeps its one conv's input, the image, FP (§10.1)
    quantized_conv_inputs: bool = False
    image_bits: int = 8

    def part_of(self, name: str) -> str | None:
        """The part the module called ``name`` plays, or None (an unnamed linear, a conv)."""
        if name.split(".", 1)[0] in self.heads:
            return HEAD
        for part, path in self.paths.items():
            if name == path or name.endswith("." + path):
                return part
        return None

    def folding_norm(self, name: str) -> str | None:
        """The LayerNorm whose output is the input of module ``name`` (its fold target)."""
        part = self.part_of(name)
        if part not in self.folds:
            return None
        owner = name[: len(name) - len(self.paths[part])]  # keeps the trailing dot
        return owner + self.folds[part]

    def block_of(self, name: str) -> str:
        """The block enclosing module ``name`` (``blocks.3``, ``layers.1.blocks.0``,
        ``layers.1.downsample``), or ``name`` itself outside any block."""
        steps = name.split(".")
        for i in range(len(steps) - 1, 0, -1):
            if steps[i - 1] in self.block_lists or steps[i] in self.block_names:
                return ".".join(steps[: i + 1])
        return name

    def rank(self, name: str) -> int:
        """Position of ``name`` in its block's execution order (-1 outside it)."""
        part = self.part_of(name)
        return self.order.index(part) if part in self.order else -1

    def is_head(self, name: str) -> bool:
        return self.part_of(name) == HEAD

    def is_unit(self, name: str, module: nn.Module) -> bool:
        """Whether ``module`` is reconstructed as one unit: a block, or a head."""
        return isinstance(module, self.units) or name in self.unit_heads

    def find(self, model: nn.Module, part: str) -> list[tuple[str, nn.Module]]:
        """Every module of ``model`` playing ``part``, in ``named_modules`` order."""
        return [(n, m) for n, m in model.named_modules() if n and self.part_of(n) == part]


_TIMM_PATHS = {
    PATCH_EMBED: "patch_embed.proj",
    QKV: "attn.qkv",
    MATMUL_QK: "attn.matmul1",
    MATMUL_AV: "attn.matmul2",
    PROJ: "attn.proj",
    FC1: "mlp.fc1",
    FC2: "mlp.fc2",
}
_BLOCK_ORDER = (QKV, MATMUL_QK, MATMUL_AV, PROJ, FC1, FC2)

#: timm VisionTransformer (ViT, DeiT, distilled DeiT with its second head).
TIMM_VIT = FamilyParts(
    paths=_TIMM_PATHS,
    folds={QKV: "norm1", FC1: "norm2"},
    heads=("head", "head_dist"),
    units=(PatchEmbed, Block),
    order=_BLOCK_ORDER,
)

#: timm SwinTransformer v1: ViT's block parts plus the patch merging's LayerNorm → reduction.
TIMM_SWIN = FamilyParts(
    paths=_TIMM_PATHS | {REDUCTION: "reduction"},
    folds={QKV: "norm1", FC1: "norm2", REDUCTION: "norm"},
    heads=("head",),
    units=(PatchEmbed, SwinTransformerBlock, PatchMerging),
    order=_BLOCK_ORDER,
    block_names=("downsample",),
)

#: A Swin detector (:mod:`adalog.models.detection`): the backbone's Swin parts and folds; the
#: FPN, RPN and RoI-head convs and linears are plain layers; every layer's input is quantized,
#: the image at 8 bits (the detection protocol of RepQ-ViT and the AdaLog paper's Table A).
SWIN_DETECTOR = FamilyParts(
    paths=TIMM_SWIN.paths,
    folds=TIMM_SWIN.folds,
    heads=(),
    units=TIMM_SWIN.units,
    order=_BLOCK_ORDER,
    block_names=("downsample",),
    unit_heads=(),
    quantized_conv_inputs=True,
)

#: Each supported family's parts, by :func:`adalog.models.factory.model_family`.
FAMILIES: dict[str, FamilyParts] = {
    "vit": TIMM_VIT,
    "deit": TIMM_VIT,
    "swin": TIMM_SWIN,
    "swin_detector": SWIN_DETECTOR,
}


def model_parts(model: nn.Module) -> FamilyParts:
    """The parts of ``model``'s family (unsupported models are refused by ``model_family``)."""
    return FAMILIES[model_family(model)]
