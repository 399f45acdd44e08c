"""One place knows each family's parts: names resolve to parts, folds to their LayerNorms, and
wrapping follows the registry rather than suffix checks of its own."""

import timm
import torch

from adalog.config import AdaLogConfig
from adalog.models.parts import (
    FAMILIES,
    FC1,
    FC2,
    HEAD,
    MATMUL_AV,
    PATCH_EMBED,
    QKV,
    REDUCTION,
    TIMM_SWIN,
    TIMM_VIT,
    FamilyParts,
    model_parts,
)
from adalog.models.wrap import wrap_model

VIT_KW = {"depth": 2, "img_size": 32, "patch_size": 16, "embed_dim": 32, "num_heads": 2}
SWIN_KW = {"img_size": 64, "window_size": 4, "depths": (1, 1), "num_heads": (1, 2), "embed_dim": 24}


def test_vit_names_resolve_to_parts_and_fold_targets():
    assert TIMM_VIT.part_of("blocks.3.attn.qkv") == QKV
    assert TIMM_VIT.part_of("blocks.3.attn.matmul2") == MATMUL_AV
    assert TIMM_VIT.part_of("blocks.11.mlp.fc2") == FC2
    assert TIMM_VIT.part_of("head") == HEAD and TIMM_VIT.part_of("head_dist") == HEAD
    assert TIMM_VIT.part_of("patch_embed.proj") == PATCH_EMBED
    assert TIMM_VIT.part_of("blocks.0.norm1") is None
    assert TIMM_VIT.part_of("blocks.0.attn.headline") is None  # "head" inside a name is no head
    assert TIMM_VIT.folding_norm("blocks.3.attn.qkv") == "blocks.3.norm1"
    assert TIMM_VIT.folding_norm("blocks.3.mlp.fc1") == "blocks.3.norm2"
    assert TIMM_VIT.folding_norm("blocks.3.attn.proj") is None
    assert TIMM_VIT.block_of("blocks.3.mlp.fc1") == "blocks.3"
    assert TIMM_VIT.block_of("head") == "head"
    assert TIMM_VIT.rank("blocks.0.attn.proj") > TIMM_VIT.rank("blocks.0.attn.matmul2")
    # distilled DeiT's second head is quantized as a head but not reconstructed on its own
    linear = torch.nn.Linear(2, 2)
    assert TIMM_VIT.is_unit("head", linear) and not TIMM_VIT.is_unit("head_dist", linear)


def test_swin_names_resolve_to_parts_and_fold_targets():
    assert TIMM_SWIN.part_of("layers.1.downsample.reduction") == REDUCTION
    assert TIMM_SWIN.folding_norm("layers.1.downsample.reduction") == "layers.1.downsample.norm"
    assert TIMM_SWIN.folding_norm("layers.0.blocks.1.mlp.fc1") == "layers.0.blocks.1.norm2"
    assert TIMM_SWIN.part_of("head.fc") == HEAD
    assert TIMM_SWIN.block_of("layers.1.downsample.reduction") == "layers.1.downsample"
    assert TIMM_SWIN.block_of("layers.0.blocks.1.attn.qkv") == "layers.0.blocks.1"


def test_families_and_find_on_real_models():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, **SWIN_KW)
    deit = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, **VIT_KW)
    assert model_parts(vit) is TIMM_VIT and model_parts(deit) is TIMM_VIT
    assert model_parts(swin) is TIMM_SWIN
    assert [n for n, _ in TIMM_VIT.find(vit, FC2)] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    assert [n for n, _ in TIMM_VIT.find(deit, HEAD)] == ["head", "head_dist"]
    # every fold target the registry names exists and is a LayerNorm
    for model, parts in ((vit, TIMM_VIT), (swin, TIMM_SWIN)):
        norms = [parts.folding_norm(n) for n, m in model.named_modules() if n]
        found = [n for n in norms if n is not None]
        assert found and all(isinstance(model.get_submodule(n), torch.nn.LayerNorm) for n in found)
    assert len([n for n in norms if n and n.endswith("downsample.norm")]) == 1


def test_wrapping_follows_the_registry(monkeypatch):
    """A family entry without folds and without fc2: wrapping then plans no LayerNorm fold and
    no post-GELU quantizer, so the roles come from the registry alone."""
    plain = FamilyParts(
        paths={k: v for k, v in TIMM_VIT.paths.items() if k != FC2},
        folds={},
        heads=TIMM_VIT.heads,
        units=TIMM_VIT.units,
        order=TIMM_VIT.order,
    )
    config = AdaLogConfig()
    roles = {
        t.name: (t.role, t.norm)
        for t in wrap_model(
            timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW), config
        )
    }
    assert roles["blocks.0.attn.qkv"] == ("linear_ln", "blocks.0.norm1")
    assert roles["blocks.0.mlp.fc1"] == ("linear_ln", "blocks.0.norm2")
    assert roles["blocks.0.mlp.fc2"][0] == "linear_gelu"
    monkeypatch.setitem(FAMILIES, "vit", plain)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, **VIT_KW)
    targets = wrap_model(model, config)
    assert {t.role for t in targets} == {"conv", "linear", "matmul_qk", "matmul_av"}
    assert all(t.norm is None for t in targets)
    # the order comes from the registry too: fc2, now no known part, ranks first in its block
    block = [t.name for t in targets if t.block == "blocks.0"]
    assert block[0] == "blocks.0.mlp.fc2" and block[1] == "blocks.0.attn.qkv"
    assert FC1 in plain.paths
