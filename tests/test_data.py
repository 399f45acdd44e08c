from pathlib import Path

import pytest
import torch
from timm.data import ImageNetInfo

from adalog.data import LabeledImageFolder, collate_skipping_bad, read_file_list, scan_image_folder
from adalog.errors import DataError
from tests.conftest import SAMPLE, require_shared, write_image


def identity(image):
    return torch.zeros(1)


def test_labels_are_imagenet_indices_not_folder_order(tiny_folder: Path):
    records = scan_image_folder(tiny_folder)
    assert [r.label for r in records] == [0, 0, 1, 1, 999, 999]
    info = ImageNetInfo()
    assert info.index_to_label_name(999) == "n15075141"


def test_shared_dev_labels_follow_wnids():
    require_shared()
    records = scan_image_folder(SAMPLE / "dev")
    assert len(records) == 500
    names = ImageNetInfo().label_names()
    assert all(names[r.label] == r.path.parent.name for r in records)
    assert len({r.label for r in records}) == 500


def test_list_keeps_and_exclude_drops(tiny_folder: Path):
    listing = tiny_folder.parent / "pick.txt"
    listing.write_text("images/n01443537/n01443537_1.png\n\nimages/n15075141/n15075141_0.png\n")
    kept = scan_image_folder(tiny_folder, include=listing)
    assert [r.path.name for r in kept] == ["n01443537_1.png", "n15075141_0.png"]
    rest = scan_image_folder(tiny_folder, exclude=listing)
    assert len(rest) == 4 and not {r.path for r in rest} & {r.path for r in kept}


def test_calib32_list_resolves_relative_to_its_directory():
    require_shared()
    paths = read_file_list(SAMPLE / "calib32.txt")
    assert len(paths) == 32 and all(p.is_file() for p in paths)
    assert len(scan_image_folder(SAMPLE / "dev", exclude=SAMPLE / "calib32.txt")) == 468
    assert len(scan_image_folder(SAMPLE / "dev", include=SAMPLE / "calib32.txt")) == 32


def test_list_naming_absent_image_is_an_error(tiny_folder: Path):
    listing = tiny_folder.parent / "pick.txt"
    listing.write_text("images/n01443537/missing.png\n")
    with pytest.raises(DataError, match="missing.png"):
        scan_image_folder(tiny_folder, include=listing)
    with pytest.raises(DataError, match="none of the images"):
        scan_image_folder(tiny_folder, exclude=listing)


def test_empty_selection_and_empty_folder(tmp_path: Path, tiny_folder: Path):
    empty = tmp_path / "empty"
    (empty / "n01440764").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        scan_image_folder(empty)
    everything = tmp_path / "all.txt"
    everything.write_text("\n".join(str(p) for p in sorted(tiny_folder.rglob("*.png"))))
    with pytest.raises(DataError, match="no images"):
        scan_image_folder(tiny_folder, exclude=everything)
    with pytest.raises(DataError, match="not found"):
        scan_image_folder(tmp_path / "nowhere")


def test_non_wnid_folders_are_refused_unless_mapped(tmp_path: Path):
    write_image(tmp_path / "cats" / "a.png", 0)
    with pytest.raises(DataError, match="WordNet ids"):
        scan_image_folder(tmp_path)
    records = scan_image_folder(tmp_path, label_map={"cats": 281})
    assert records[0].label == 281


def test_corrupt_image_names_the_file_or_is_skipped(tiny_folder: Path):
    bad = tiny_folder / "n01440764" / "n01440764_9.png"
    bad.write_bytes(b"\x89PNG broken")
    records = scan_image_folder(tiny_folder)
    strict = LabeledImageFolder(records, identity)
    with pytest.raises(DataError, match="n01440764_9.png"):
        [strict[i] for i in range(len(strict))]
    lenient = LabeledImageFolder(records, identity, skip_bad_images=True)
    images, labels, skipped = collate_skipping_bad([lenient[i] for i in range(len(lenient))])
    assert skipped == 1 and labels.tolist() == [0, 0, 1, 1, 999, 999]
