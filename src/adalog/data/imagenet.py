"""An ImageNet-style folder (``<root>/<wnid>/<image>``) with standard ImageNet-1k labels.

Labels are the ImageNet-1k index of each WordNet id (timm's ``ImageNetInfo``), never the
folder's position, so any subset of classes keeps correct labels.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, default_collate

from adalog.errors import DataError

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    label: int


def imagenet_label_map() -> dict[str, int]:
    """WordNet id → standard ImageNet-1k class index."""
    from timm.data import ImageNetInfo

    return {wnid: i for i, wnid in enumerate(ImageNetInfo().label_names())}


def load_label_map(source: str | Path | Mapping[str, int] | None) -> dict[str, int]:
    """The default wnid map, or a user map given as a dict or a JSON file ``{folder: index}``."""
    if source is None:
        return imagenet_label_map()
    if isinstance(source, Mapping):
        return dict(source)
    try:
        mapping = json.loads(Path(source).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataError(f"could not read label map {source}: {exc}") from exc
    if not isinstance(mapping, dict) or not all(isinstance(v, int) for v in mapping.values()):
        raise DataError(f"label map {source} must be a JSON object of folder name → int index")
    return mapping


def read_file_list(list_file: str | Path) -> list[Path]:
    """Image paths listed one per line, relative to the list file's own directory."""
    list_file = Path(list_file)
    try:
        lines = list_file.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"could not read file list {list_file}: {exc}") from exc
    base = list_file.resolve().parent
    paths = [(base / line.strip()).resolve() for line in lines if line.strip()]
    if not paths:
        raise DataError(f"file list {list_file} is empty")
    return paths


def scan_image_folder(
    root: str | Path,
    label_map: str | Path | Mapping[str, int] | None = None,
    include: str | Path | None = None,
    exclude: str | Path | None = None,
) -> list[ImageRecord]:
    """List the labelled images of ``root``, optionally kept to / stripped of a file list."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    labels = load_label_map(label_map)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [p.name for p in class_dirs if p.name not in labels]
    if unknown:
        shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise DataError(
            f"{root}: class folders must be ImageNet WordNet ids (e.g. n01440764) or be named in "
            f"a --label-map JSON; unknown: {shown}"
        )
    records = [
        ImageRecord(f.resolve(), labels[d.name])
        for d in class_dirs
        for f in sorted(d.iterdir())
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    ]
    records = _apply_lists(root, records, include, exclude)
    if not records:
        raise DataError(f"no images selected in {root}")
    return records


def list_images(root: str | Path, include: str | Path | None = None) -> list[Path]:
    """The image files of ``root`` (any depth, sorted, no labels needed), or those of the
    ``include`` file list, which must all be in ``root``."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder not found: {root}")
    found = sorted(
        f.resolve() for f in root.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
    )
    if include is not None:
        present = set(found)
        wanted = list(dict.fromkeys(read_file_list(include)))
        absent = [str(p) for p in wanted if p not in present]
        if absent:
            raise DataError(
                f"{len(absent)} images of list {include} are not in {root}: {', '.join(absent[:5])}"
            )
        found = wanted
    if not found:
        raise DataError(f"no images found in {root}")
    return found


def spread_sample(paths: list[Path], size: int, seed: int) -> list[Path]:
    """``size`` of ``paths`` drawn at random under ``seed`` and spread over their folders: one
    image of each folder (in shuffled order) before a second of any, so a class-sorted folder
    such as ImageNet's validation set gives as many classes as possible."""
    if size >= len(paths):
        return list(paths)
    rng = random.Random(seed)
    groups: dict[Path, list[Path]] = {}
    for path in paths:
        groups.setdefault(path.parent, []).append(path)
    queues = list(groups.values())
    for queue in queues:
        rng.shuffle(queue)
    rng.shuffle(queues)
    picked: list[Path] = []
    for rank in range(max(len(q) for q in queues)):
        picked += [q[rank] for q in queues if rank < len(q)]
        if len(picked) >= size:
            break
    return picked[:size]


def _apply_lists(
    root: Path, records: list[ImageRecord], include: str | Path | None, exclude: str | Path | None
) -> list[ImageRecord]:
    by_path = {r.path: r for r in records}
    if include is not None:
        wanted = read_file_list(include)
        absent = [str(p) for p in wanted if p not in by_path]
        if absent:
            raise DataError(
                f"{len(absent)} images of list {include} are not in {root}: {', '.join(absent[:5])}"
            )
        records = [by_path[p] for p in dict.fromkeys(wanted)]
    if exclude is not None:
        dropped = set(read_file_list(exclude))
        if not dropped & set(by_path):
            raise DataError(f"none of the images of exclude list {exclude} are in {root}")
        records = [r for r in records if r.path not in dropped]
    return records


class LabeledImageFolder(Dataset):
    """Dataset over ``ImageRecord``s; an unreadable image is an error naming the file.

    With ``skip_bad_images`` a bad image yields ``None``; ``collate_skipping_bad`` drops it
    and counts it, so evaluation can report how many were skipped.
    """

    def __init__(
        self,
        records: list[ImageRecord],
        transform: Callable[[Image.Image], torch.Tensor],
        skip_bad_images: bool = False,
    ) -> None:
        if not records:
            raise DataError("empty image selection")
        self.records = records
        self.transform = transform
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | None:
        record = self.records[index]
        try:
            with Image.open(record.path) as img:
                image = img.convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            if self.skip_bad_images:
                return None
            raise DataError(f"cannot read image {record.path}: {exc}") from exc
        return self.transform(image), record.label


def collate_skipping_bad(batch: list) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Collate good samples; return ``(images, labels, n_skipped)``."""
    good = [sample for sample in batch if sample is not None]
    skipped = len(batch) - len(good)
    if not good:
        return torch.empty(0, 3, 1, 1), torch.empty(0, dtype=torch.long), skipped
    images, labels = default_collate(good)
    return images, labels, skipped
