"""COCO-format instance sets (an image folder and an annotation file) for detection.

Checked when opened, so a bad run stops before any model work: the annotation file must read,
every listed image must be on disk, and every category an annotation uses must be one of the
model's classes (matched by name; label ``l`` is class ``l - 1`` of the model).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

from adalog.errors import DataError

_LISTED = 10


def open_coco(annotation_file: str | Path):
    """A ``pycocotools`` COCO index of ``annotation_file`` (quietly; errors are DataError)."""
    from pycocotools.coco import COCO

    path = Path(annotation_file)
    if not path.is_file():
        raise DataError(f"annotation file not found: {path}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(path))
    except Exception as exc:  # malformed JSON or not COCO: one message for the user
        raise DataError(f"could not read COCO annotations {path}: {exc}") from exc


class CocoInstances(Dataset):
    """Images (float CHW in [0, 1]) of a COCO set with their targets in torchvision's format.

    ``limit`` keeps the first N images by id, for quick looks.
    """

    def __init__(
        self,
        images_root: str | Path,
        annotation_file: str | Path,
        classes: Sequence[str],
        limit: int | None = None,
    ) -> None:
        self.root = Path(images_root)
        self.coco = open_coco(annotation_file)
        self.label_of_category = _category_labels(self.coco, classes, annotation_file)
        self.category_of_label = {v: k for k, v in self.label_of_category.items()}
        ids = sorted(self.coco.getImgIds())
        self.image_ids = ids[:limit] if limit is not None else ids
        missing = [
            self.coco.imgs[i]["file_name"]
            for i in self.image_ids
            if not (self.root / self.coco.imgs[i]["file_name"]).is_file()
        ]
        if missing:
            more = f" (+{len(missing) - _LISTED} more)" if len(missing) > _LISTED else ""
            raise DataError(
                f"{len(missing)} image(s) of {annotation_file} missing under {self.root}: "
                f"{', '.join(missing[:_LISTED])}{more}"
            )

    def __len__(self) -> int:
        return len(self.image_ids)

    def image(self, index: int) -> Tensor:
        info = self.coco.imgs[self.image_ids[index]]
        path = self.root / info["file_name"]
        try:
            with Image.open(path) as image:
                return pil_to_tensor(image.convert("RGB")).float().div_(255)
        except OSError as exc:
            raise DataError(f"could not read image {path}: {exc}") from exc

    def target(self, index: int) -> dict[str, Tensor]:
        """Non-crowd instances: ``boxes`` (x1, y1, x2, y2), ``labels``, ``masks`` (uint8)."""
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        anns = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        anns = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        masks = (
            np.stack([self.coco.annToMask(a) for a in anns])
            if anns
            else np.zeros((0, info["height"], info["width"]), dtype=np.uint8)
        )
        return {
            "boxes": boxes,
            "labels": torch.tensor(
                [self.label_of_category[a["category_id"]] for a in anns], dtype=torch.int64
            ),
            "masks": torch.from_numpy(masks),
        }

    def __getitem__(self, index: int) -> tuple[int, Tensor, dict[str, Tensor]]:
        return self.image_ids[index], self.image(index), self.target(index)


def _category_labels(coco, classes: Sequence[str], source) -> dict[int, int]:
    """COCO category id → model label (1-based), by category name."""
    position = {name: i + 1 for i, name in enumerate(classes)}
    labels = {c["id"]: position[c["name"]] for c in coco.cats.values() if c["name"] in position}
    used = {a["category_id"] for a in coco.anns.values()}
    unknown = sorted(used - set(labels))
    if unknown:
        names = [f"{i} ({coco.cats[i]['name']})" if i in coco.cats else str(i) for i in unknown]
        raise DataError(
            f"{source}: annotations use categories unknown to the model: {', '.join(names)}; "
            f"the model's classes are {', '.join(classes)}"
        )
    return labels
