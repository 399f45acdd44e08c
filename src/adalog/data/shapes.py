"""A generated COCO-format instance-segmentation set of simple shapes, for detection checks
where COCO itself is not at hand (tests, the proxy benchmark).

Each image holds a few filled discs, squares and triangles over a noisy colour gradient; later
shapes occlude earlier ones, and every annotation is the visible part (an RLE mask, its box and
area). The set is a pure function of its seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from adalog.io import atomic_write_text

SHAPE_CLASSES = ("disc", "square", "triangle")
#: shapes hidden below this fraction of their own area are dropped from the image
_MIN_VISIBLE = 0.4


def _draw_shape(kind: str, size: int, centre: tuple[float, float], angle: float, shape_hw):
    """The shape's filled pixels as a boolean mask of ``shape_hw``."""
    canvas = Image.new("1", (shape_hw[1], shape_hw[0]), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = centre[0], centre[1], size / 2
    if kind == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        corners = 4 if kind == "square" else 3
        radius = r * (1.41 if kind == "square" else 1.15)
        angles = angle + np.arange(corners) * 2 * np.pi / corners
        draw.polygon([(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles], fill=1)
    return np.array(canvas, dtype=bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    corners = rng.uniform(0, 255, size=(2, 2, 3))
    ys, xs = np.linspace(0, 1, height)[:, None, None], np.linspace(0, 1, width)[None, :, None]
    top = corners[0, 0] * (1 - xs) + corners[0, 1] * xs
    bottom = corners[1, 0] * (1 - xs) + corners[1, 1] * xs
    return top * (1 - ys) + bottom * ys + rng.normal(0, 12, size=(height, width, 3))


def make_shapes_image(rng: np.random.Generator, size: int, max_shapes: int):
    """One image (uint8 HWC) and its instances: ``(class index, visible mask)`` pairs, shapes
    hidden below ``_MIN_VISIBLE`` of their own area left out."""
    image = _background(rng, size, size)
    placed: list[tuple[int, np.ndarray, int]] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        kind = int(rng.integers(len(SHAPE_CLASSES)))
        side = float(rng.uniform(0.12, 0.45) * size)
        centre = tuple(rng.uniform(side / 2, size - side / 2, size=2))
        mask = _draw_shape(SHAPE_CLASSES[kind], side, centre, rng.uniform(0, np.pi), image.shape)
        image[mask] = rng.uniform(0, 255, size=3) + rng.normal(0, 8, size=(int(mask.sum()), 3))
        placed = [(k, m & ~mask, area) for k, m, area in placed]
        placed.append((kind, mask, int(mask.sum())))
    kept = [(k, m) for k, m, area in placed if area and m.sum() >= _MIN_VISIBLE * area]
    return np.clip(image, 0, 255).astype(np.uint8), kept


def write_shapes_split(
    root: str | Path, split: str, count: int, seed: int, size: int = 192, max_shapes: int = 4
) -> Path:
    """Write ``count`` images to ``root/split/`` and their annotations to
    ``root/annotations_{split}.json`` (COCO format, categories 1..3); returns the latter."""
    from pycocotools import mask as mask_utils

    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images, annotations = [], []
    for index in range(count):
        pixels, instances = make_shapes_image(rng, size, max_shapes)
        file_name = f"{index:05d}.png"
        Image.fromarray(pixels).save(root / split / file_name)
        images.append({"id": index + 1, "file_name": file_name, "height": size, "width": size})
        for kind, mask in instances:
            rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
            x, y, w, h = mask_utils.toBbox(rle).tolist()
            annotations.append({
                "id": len(annotations) + 1, "image_id": index + 1, "category_id": kind + 1,
                "segmentation": {"size": rle["size"], "counts": rle["counts"].decode("ascii")},
                "area": float(mask.sum()), "bbox": [x, y, w, h], "iscrowd": 0,
            })  # fmt: skip
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(SHAPE_CLASSES)]
    document = {"images": images, "annotations": annotations, "categories": categories}
    path = root / f"annotations_{split}.json"
    atomic_write_text(path, json.dumps(document))
    return path
