"""COCO layout checks and the generated set (no mmdet needed)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moca_eval.detection import coco
from moca_eval.errors import DatasetError


def copy_of(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "coco"))


def test_generated_set_is_a_valid_coco_layout_with_every_area_range(tiny_coco):
    splits = coco.check_layout(tiny_coco)
    assert splits["train"].n_images == 4 and splits["val"].n_images == 2
    assert splits["train"].classes == coco.SYNTHETIC_CLASSES
    val = json.loads(coco.ann_file(tiny_coco, "val").read_text())
    areas = [a["area"] for a in val["annotations"]]
    assert min(areas) < 32**2 and max(areas) > 96**2 and any(32**2 < a < 96**2 for a in areas)
    for ann in val["annotations"]:  # the box is the polygon's extent, the area its shoelace area
        xy = np.array(ann["segmentation"][0]).reshape(-1, 2)
        x, y, w, h = ann["bbox"]
        assert (x, y) == pytest.approx(tuple(xy.min(0))) and (x + w, y + h) == pytest.approx(tuple(xy.max(0)))
    image = Image.open(coco.image_dir(tiny_coco, "val") / val["images"][0]["file_name"])
    assert image.size == (256, 160) and image.mode == "RGB"


def test_generation_is_deterministic(tiny_coco, tmp_path):
    again = coco.make_synthetic_coco(tmp_path / "again", n_train=4, n_val=2)
    for split in coco.SPLITS:
        assert coco.ann_file(again, split).read_text() == coco.ann_file(tiny_coco, split).read_text()


def test_missing_pieces_are_one_line_errors_naming_the_file(tiny_coco, tmp_path):
    root = copy_of(tiny_coco, tmp_path)
    with pytest.raises(DatasetError, match="no such COCO directory"):
        coco.check_layout(tmp_path / "absent")
    coco.ann_file(root, "val").unlink()
    with pytest.raises(DatasetError, match=r"instances_val2017\.json: no such annotation file"):
        coco.check_layout(root)
    shutil.rmtree(coco.image_dir(root, "train"))
    with pytest.raises(DatasetError, match=r"train2017: no such image folder"):
        coco.check_layout(root)


def test_missing_images_are_counted_and_the_first_named(tiny_coco, tmp_path):
    root = copy_of(tiny_coco, tmp_path)
    first = sorted(coco.image_dir(root, "train").iterdir())[0]
    first.unlink()
    expected = rf"instances_train2017\.json: 1 of 4 images .* \(first: {first.name}\)"
    with pytest.raises(DatasetError, match=expected):
        coco.check_layout(root)


@pytest.mark.parametrize(("content", "expected"), [
    ("{not json", "not a readable JSON file"),
    ('["a list"]', "not a COCO instances file"),
    ('{"images": [], "annotations": []}', "not a COCO instances file"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": [{"id": 1, "name": "a"}]}',
     r"images\[0\] lacks file_name, width, height"),
    ('{"images": [], "annotations": [], "categories": []}', "no categories"),
    ('{"images": [], "annotations": [{"id": 1, "image_id": 5, "category_id": 1, "bbox": [0, 0, 1, 1]}], '
     '"categories": [{"id": 1, "name": "a"}]}', "names image 5"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "a"}]}',
     "categories name 'a' appears more than once"),
])
def test_malformed_annotation_files_are_rejected(tiny_coco, tmp_path, content, expected):
    root = copy_of(tiny_coco, tmp_path)
    coco.ann_file(root, "train").write_text(content)
    with pytest.raises(DatasetError, match=expected) as err:
        coco.check_layout(root)
    assert str(err.value).startswith(str(coco.ann_file(root, "train")))


def test_train_and_val_must_share_their_categories(tiny_coco, tmp_path):
    root = copy_of(tiny_coco, tmp_path)
    path = coco.ann_file(root, "val")
    data = json.loads(path.read_text())
    data["categories"][0]["name"] = "renamed"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="categories differ"):
        coco.check_layout(root)
