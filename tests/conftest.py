"""Shared fixtures: paths to ../shared assets and tiny synthetic image folders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SAMPLE = SHARED / "data" / "imagenet-sample"
VIT_WEIGHTS = SHARED / "models" / "vit_tiny_patch16_224.augreg_in21k_ft_in1k.safetensors"
DEIT_WEIGHTS = SHARED / "models" / "deit_tiny_patch16_224.fb_in1k_lnq.safetensors"


def require_shared() -> None:
    if not VIT_WEIGHTS.is_file():
        pytest.skip("../shared assets not present")


def write_image(path: Path, seed: int, size: int = 40) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """Three wnid classes (ImageNet indices 0, 1 and 999) with two images each."""
    root = tmp_path / "images"
    for c, wnid in enumerate(["n01440764", "n01443537", "n15075141"]):
        for i in range(2):
            write_image(root / wnid / f"{wnid}_{i}.png", seed=10 * c + i)
    return root


@pytest.fixture
def random_deit_and_images(tmp_path: Path) -> tuple[Path, Path]:
    """A randomly initialised DeiT-Tiny weight file and a 2-class folder of 256-px images."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model("deit_tiny_patch16_224").state_dict(), str(weights))
    data = tmp_path / "data"
    for i, wnid in enumerate(["n01440764", "n01443537"]):
        write_image(data / wnid / f"{wnid}_0.png", seed=i, size=256)
    return weights, data
