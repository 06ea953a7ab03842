"""COCO 2017 layout checks (before mmengine starts) and a generated COCO-format set for tests.

The layout ``moca-eval det`` reads (the official one)::

    ROOT/annotations/instances_train2017.json
    ROOT/annotations/instances_val2017.json
    ROOT/train2017/<file_name>
    ROOT/val2017/<file_name>

Every problem is a one-line ``DatasetError`` naming the file: mmdet would otherwise fail deep
inside a dataloader worker, or, for a missing image, only when the sampler reaches it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from moca_eval.errors import DatasetError
from moca_eval.results import atomic_path, write_json_atomic

SPLITS = ("train", "val")
YEAR = "2017"


def ann_file(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"instances_{split}{YEAR}.json"


def image_dir(root: Path, split: str) -> Path:
    return Path(root) / f"{split}{YEAR}"


@dataclass(frozen=True)
class CocoSplit:
    """What the checks learnt about one split."""

    split: str
    ann_file: Path
    image_dir: Path
    n_images: int
    n_annotations: int
    classes: tuple[str, ...]  # category names in the file's order (mmdet's and pycocotools' label order)


def check_split(root: Path, split: str) -> CocoSplit:
    """The annotation file and image folder of ``split``: present, COCO-shaped, complete."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such COCO directory (expected annotations/, train{YEAR}/, "
                           f"val{YEAR}/)")
    path, folder = ann_file(root, split), image_dir(root, split)
    if not path.is_file():
        raise DatasetError(f"{path}: no such annotation file (unpack annotations_trainval{YEAR}.zip "
                           f"into {root})")
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such image folder (unpack {split}{YEAR}.zip into {root})")
    data = _read_json(path)
    images, anns, cats = _coco_lists(data, path)
    missing = [img["file_name"] for img in images if not (folder / img["file_name"]).is_file()]
    if missing:
        raise DatasetError(f"{path}: {len(missing)} of {len(images)} images named in it are not in {folder} "
                           f"(first: {missing[0]})")
    classes = tuple(c["name"] for c in cats)
    return CocoSplit(split, path, folder, len(images), len(anns), classes)


def check_layout(root: Path) -> dict[str, CocoSplit]:
    """Both splits checked; they must share their categories."""
    splits = {split: check_split(root, split) for split in SPLITS}
    if splits["train"].classes != splits["val"].classes:
        raise DatasetError(f"{splits['val'].ann_file}: its categories differ from those of "
                           f"{splits['train'].ann_file} (train and val must share one category list)")
    return splits


def limited_ann_file(split: CocoSplit, limit: float, out_root: Path) -> Path:
    """``split``'s annotations cut to its first images by id (``limit``: a count or a fraction,
    see ``pipeline.limit_count``) and their annotations, categories unchanged, written where
    ``ann_file(out_root, split)`` points."""
    from moca_eval.pipeline import limit_count

    data = _read_json(split.ann_file)
    images = sorted(data["images"], key=lambda img: img["id"])[:limit_count(limit, split.n_images)]
    kept = {img["id"] for img in images}
    path = ann_file(out_root, split.split)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {**data, "images": images,
                             "annotations": [a for a in data["annotations"] if a["image_id"] in kept]})
    return path


def _read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DatasetError(f"{path}: not a readable JSON file ({err})") from None


def _coco_lists(data: object, path: Path) -> tuple[list[dict], list[dict], list[dict]]:
    """``images``, ``annotations``, ``categories`` with the fields mmdet and pycocotools read."""
    need = {"images": ("id", "file_name", "width", "height"),
            "annotations": ("id", "image_id", "category_id", "bbox"),
            "categories": ("id", "name")}
    if not isinstance(data, dict) or any(not isinstance(data.get(k), list) for k in need):
        found = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"{path}: not a COCO instances file (expected the lists 'images', 'annotations' "
                           f"and 'categories'; found {found})")
    for key, fields in need.items():
        for i, entry in enumerate(data[key]):
            lacking = [f for f in fields if not isinstance(entry, dict) or f not in entry]
            if lacking:
                raise DatasetError(f"{path}: {key}[{i}] lacks {', '.join(lacking)} "
                                   "(not a COCO instances file)")
    if not data["categories"]:
        raise DatasetError(f"{path}: no categories")
    for key, field in (("images", "id"), ("annotations", "id"), ("categories", "id"), ("categories", "name")):
        counts = Counter(entry[field] for entry in data[key])
        if len(counts) != len(data[key]):
            twice = next(v for v, n in counts.items() if n > 1)
            raise DatasetError(f"{path}: {key} {field} {twice!r} appears more than once "
                               "(they must be unique)")
    image_ids = {img["id"] for img in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    for i, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in image_ids or ann["category_id"] not in cat_ids:
            raise DatasetError(f"{path}: annotations[{i}] names image {ann['image_id']} / category "
                               f"{ann['category_id']}, not listed in 'images' / 'categories'")
    return data["images"], data["annotations"], data["categories"]


# ---------------------------------------------------------------------------------------------
# A generated COCO-format set: solid shapes on noise, one colour per class, polygon masks.

SYNTHETIC_CLASSES = ("square", "triangle", "disc")
_COLOURS = np.array([(220, 60, 50), (60, 180, 75), (40, 90, 220)], dtype=np.float64)
# Small (< 32^2 px), medium (< 96^2) and large instances whatever their shape, with the large
# one as tall as the image (>= 144 px): every COCO area range has objects.
_SMALL, _MEDIUM = 20, 48


def make_synthetic_coco(root: Path, *, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (160, 256),
                        seed: int = 0, classes: Sequence[str] = SYNTHETIC_CLASSES) -> Path:
    """Write a tiny COCO-format set in the official layout; deterministic from ``seed``.

    Every image holds three non-overlapping shapes, one per COCO area range (small, medium,
    large), each with its polygon, box and area; shape and colour follow the class.
    """
    root = Path(root)
    height, width = size
    for split_no, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        images, anns = [], []
        folder = image_dir(root, split)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            rng = np.random.default_rng([seed, split_no, i])
            image_id = split_no * 100_000 + i + 1
            pixels = rng.normal(128.0, 20.0, (height, width, 3))
            canvas = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
            draw = ImageDraw.Draw(canvas)
            for poly, label in _layout_shapes(rng, height, width, len(classes)):
                rgb = np.clip(_COLOURS[label % len(_COLOURS)] + rng.normal(0, 8, 3), 0, 255)
                colour = tuple(int(c) for c in rgb)
                draw.polygon([tuple(p) for p in poly], fill=colour)
                anns.append(_annotation(len(anns) + 1 + split_no * 1_000_000, image_id, label + 1, poly))
            name = f"{image_id:012d}.jpg"
            with atomic_path(folder / name) as tmp:
                canvas.save(tmp, format="JPEG", quality=95)
            images.append({"id": image_id, "file_name": name, "width": width, "height": height})
        categories = [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(classes)]
        write_json_atomic(ann_file(root, split), {
            "info": {"description": "moca-eval synthetic COCO", "year": int(YEAR)},
            "licenses": [], "images": images, "annotations": anns, "categories": categories})
    return root


def _layout_shapes(rng: np.random.Generator, height: int, width: int, n_classes: int
                   ) -> list[tuple[np.ndarray, int]]:
    """A large shape on one side, a medium and a small one stacked beside it (no overlap)."""
    large = height - 8
    rest = width - large - 6
    if large < 144 or rest < _MEDIUM + 4:
        raise ValueError(f"synthetic COCO images must be at least 152 x {152 + _MEDIUM + 10} px")
    left = bool(rng.integers(2))
    x_large = 2 if left else width - large - 2
    x_rest = large + 4 if left else 2
    half = height // 2
    boxes = [(x_large, 4, large)]
    for side, top in ((_MEDIUM, 2), (_SMALL, half)):  # medium in the upper half, small in the lower
        x0 = x_rest + int(rng.integers(0, rest - side + 1))
        boxes.append((x0, top + int(rng.integers(0, half - side - 2)), side))
    shapes = []
    for x0, y0, side in boxes:
        label = int(rng.integers(n_classes))
        shapes.append((_polygon(label % 3, x0, y0, side), label))
    return shapes


def _polygon(kind: int, x0: int, y0: int, side: int) -> np.ndarray:
    """A square, triangle or 16-gon disc inside the box ``(x0, y0, side, side)``, as ``[N, 2]`` float."""
    if kind == 0:
        pts = [(0, 0), (1, 0), (1, 1), (0, 1)]
    elif kind == 1:
        pts = [(0.5, 0), (1, 1), (0, 1)]
    else:
        pts = [(0.5 + 0.5 * math.cos(a), 0.5 + 0.5 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 16,
                                                                                          endpoint=False)]
    return np.round(np.array(pts) * side + [x0, y0], 1)


def _annotation(ann_id: int, image_id: int, category_id: int, poly: np.ndarray) -> dict:
    x, y = poly[:, 0], poly[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    x1, y1 = float(x.min()), float(y.min())
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "iscrowd": 0,
            "area": round(area, 2),
            "bbox": [x1, y1, round(float(x.max()) - x1, 2), round(float(y.max()) - y1, 2)],
            "segmentation": [[round(float(v), 2) for v in poly.reshape(-1)]]}
