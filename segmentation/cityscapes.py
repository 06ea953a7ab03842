"""Cityscapes layout, label ids -> trainIds, French et al. 2020 low-shot splits, synthetic data."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from moca_eval.errors import ConfigError, DatasetError
from moca_eval.results import atomic_path

CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle",
    "bicycle",
)
PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153), (153, 153, 153),
    (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152), (70, 130, 180), (220, 20, 60),
    (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100), (0, 80, 100), (0, 0, 230), (119, 11, 32),
)
IGNORE_INDEX = 255

# cityscapesScripts helpers/labels.py: label id -> trainId. License plate (-1) has trainId -1
# there and is ignored in training like every other 255 entry.
ID_TO_TRAIN_ID: dict[int, int] = {
    0: 255, 1: 255, 2: 255, 3: 255, 4: 255, 5: 255, 6: 255, 7: 0, 8: 1, 9: 255, 10: 255, 11: 2,
    12: 3, 13: 4, 14: 255, 15: 255, 16: 255, 17: 5, 18: 255, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
    24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 29: 255, 30: 255, 31: 16, 32: 17, 33: 18, -1: 255,
}
_LUT = np.full(256, IGNORE_INDEX, dtype=np.uint8)
for _id, _train_id in ID_TO_TRAIN_ID.items():
    if _id >= 0:
        _LUT[_id] = _train_id

SPLIT_SEEDS = (12345, 23456, 34567)
TRAIN_SIZES: dict[str, int | None] = {"100": 100, "372": 372, "full": None}
FULL_TRAIN_COUNT = 2975

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"


def to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """Map a label-id map to trainIds (uint8); ids outside the table become 255."""
    label_ids = np.asarray(label_ids)
    if label_ids.dtype == np.uint8:
        return _LUT[label_ids]
    out = np.full(label_ids.shape, IGNORE_INDEX, dtype=np.uint8)
    valid = (label_ids >= 0) & (label_ids < 256)
    out[valid] = _LUT[label_ids[valid].astype(np.intp)]
    return out


def image_stem(path: str | Path) -> str:
    """``<...>/aachen/aachen_000000_000019_leftImg8bit.png`` -> ``aachen/aachen_000000_000019``.

    gtFine file names (``..._gtFine_<kind>.png``) give the same stem.
    """
    path = Path(path)
    name = path.name
    if name.endswith(IMAGE_SUFFIX):
        base = name[: -len(IMAGE_SUFFIX)]
    elif "_gtFine_" in name:
        base = name[: name.index("_gtFine_")]
    else:
        raise DatasetError(f"{path}: not a Cityscapes file name (want <city>_xxxxxx_yyyyyy{IMAGE_SUFFIX})")
    return f"{path.parent.name}/{base}"


def _split_images(root: Path, split: str) -> list[Path]:
    """The ``*_leftImg8bit.png`` files of one split, sorted by stem."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such Cityscapes directory")
    split_dir = root / "leftImg8bit" / split
    if not split_dir.is_dir():
        parent = root / "leftImg8bit"
        have = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent.is_dir() else []
        raise DatasetError(
            f"{split_dir}: no such folder (found: {', '.join(have) or 'nothing'}; expected "
            f"{root}/leftImg8bit/{split}/<city>/<city>_xxxxxx_yyyyyy{IMAGE_SUFFIX}, "
            "from leftImg8bit_trainvaltest.zip)"
        )
    images = sorted(split_dir.glob(f"*/*{IMAGE_SUFFIX}"), key=image_stem)
    if not images:
        raise DatasetError(f"{split_dir}: no <city>/*{IMAGE_SUFFIX} images")
    return images


def list_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """``(image, labelTrainIds)`` pairs from ``root/leftImg8bit/<split>`` and ``root/gtFine/<split>``.

    Sorted by stem; every image must have its label file.
    """
    root = Path(root)
    pairs = []
    missing = []
    for image in _split_images(root, split):
        name = image.name.replace(IMAGE_SUFFIX, TRAIN_IDS_SUFFIX)
        label = root / "gtFine" / split / image.parent.name / name
        pairs.append((image, label))
        if not label.is_file():
            missing.append(label)
    if missing:
        label_ids = missing[0].with_name(missing[0].name.replace(TRAIN_IDS_SUFFIX, LABEL_IDS_SUFFIX))
        how = (f"run `moca-eval seg prepare --data {root}` to make them from the *{LABEL_IDS_SUFFIX} files"
               if label_ids.is_file() else
               f"no *{LABEL_IDS_SUFFIX} beside it either: unpack gtFine_trainvaltest.zip into {root}, "
               f"then run `moca-eval seg prepare --data {root}`")
        raise DatasetError(f"{missing[0]}: no such label file ({len(missing)} of {len(pairs)} {split} images "
                           f"have no *{TRAIN_IDS_SUFFIX}; {how})")
    return pairs


def _read_label_ids(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            img.load()
            arr = np.asarray(img)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DatasetError(f"{path}: cannot decode the label-id PNG ({err})") from err
    if arr.ndim != 2:
        raise DatasetError(f"{path}: expected a single-channel label-id image, found shape {arr.shape}")
    return arr


def prepare_train_ids(root: Path, splits: Sequence[str] = ("train", "val"), *, overwrite: bool = False,
                      progress: bool = True) -> int:
    """Write ``*_gtFine_labelTrainIds.png`` beside each ``*_gtFine_labelIds.png`` that lacks one.

    Returns:
        How many files were written (all of them with ``overwrite``).
    """
    from tqdm import tqdm

    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such Cityscapes directory")
    todo: list[tuple[Path, Path]] = []
    for split in splits:
        split_dir = root / "gtFine" / split
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir}: no such folder (expected gtFine/{split}/<city>/"
                               f"*{LABEL_IDS_SUFFIX}, from gtFine_trainvaltest.zip)")
        sources = sorted(split_dir.glob(f"*/*{LABEL_IDS_SUFFIX}"))
        if not sources and not any(split_dir.glob(f"*/*{TRAIN_IDS_SUFFIX}")):
            raise DatasetError(f"{split_dir}: no <city>/*{LABEL_IDS_SUFFIX} label files")
        for src in sources:
            dst = src.with_name(src.name.replace(LABEL_IDS_SUFFIX, TRAIN_IDS_SUFFIX))
            if overwrite or not dst.is_file():
                todo.append((src, dst))
    for src, dst in tqdm(todo, desc="labelTrainIds", unit="img", disable=not progress):
        train_ids = to_train_ids(_read_label_ids(src))
        with atomic_path(dst) as tmp:
            Image.fromarray(train_ids).save(tmp, format="PNG")
    return len(todo)


def train_names(root: Path) -> list[str]:
    """Sorted stems (``city/city_xxxxxx_yyyyyy``) of the train images."""
    return [image_stem(p) for p in _split_images(Path(root), "train")]


def french_split(names: Sequence[str], size: int, seed: int) -> list[str]:
    """French et al. 2020: the first ``size`` of ``RandomState(seed).permutation`` of the sorted names.

    The result is in permutation order, so a smaller split of a seed is a prefix of a larger one.
    """
    if not 1 <= size <= len(names):
        raise ConfigError(f"split size {size} is not in 1..{len(names)} (the number of train images)")
    ordered = sorted(names)
    return [ordered[i] for i in np.random.RandomState(seed).permutation(len(ordered))[:size]]


def read_names(path: Path) -> list[str]:
    """One stem per line; blank lines are skipped."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such split file (expected one city/city_xxxxxx_yyyyyy name per line)")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def write_names(path: Path, names: Sequence[str]) -> None:
    """Write one stem per line, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(f"{name}\n" for name in names))


def check_names_known(names: Sequence[str], known: Sequence[str], source: Path) -> None:
    """Raise DatasetError listing the names of ``source`` that are not in ``known``."""
    known_set = set(known)
    unknown = [name for name in names if name not in known_set]
    if unknown:
        more = "..." if len(unknown) > 5 else ""
        listed = ", ".join(unknown[:5])
        raise DatasetError(f"{source}: {len(unknown)} name(s) not in the dataset: {listed}{more}")


# Synthetic data: mean colour per label id (the class palette; fixed colours for ignored ids).
_SYNTH_COLOURS = np.zeros((256, 3), dtype=np.float32)
for _id, _train_id in ID_TO_TRAIN_ID.items():
    if 0 <= _id and _train_id != IGNORE_INDEX:
        _SYNTH_COLOURS[_id] = PALETTE[_train_id]
_SYNTH_COLOURS[0] = (20, 20, 20)  # unlabeled
_SYNTH_COLOURS[1] = (90, 60, 40)  # ego vehicle


def _synthetic_label_ids(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A street-like label-id map: sky, buildings with trees, road with sidewalk, cars, people."""
    def rows(lo: float, hi: float) -> int:
        return int(round(height * rng.uniform(lo, hi)))

    def cols(lo: float, hi: float) -> int:
        return int(round(width * rng.uniform(lo, hi)))

    lab = np.full((height, width), 23, dtype=np.uint8)  # sky
    horizon, road_top = rows(0.2, 0.35), rows(0.5, 0.6)
    lab[horizon:road_top] = 11  # building
    for _ in range(rng.integers(1, 3)):  # vegetation
        x0, top = cols(0.0, 0.8), rows(0.1, 0.3)
        lab[top:road_top, x0:x0 + cols(0.1, 0.25)] = 21
    lab[road_top:] = 7  # road
    sidewalk = cols(0.1, 0.25)
    side = slice(0, sidewalk) if rng.random() < 0.5 else slice(width - sidewalk, width)
    lab[road_top:, side] = 8  # sidewalk
    for _ in range(rng.integers(1, 4)):  # car
        h, w = rows(0.1, 0.18), cols(0.1, 0.2)
        bottom, x0 = rows(0.65, 0.9), cols(0.0, 0.8)
        lab[max(bottom - h, 0):bottom, x0:x0 + w] = 26
    for _ in range(rng.integers(1, 3)):  # person
        h, w = rows(0.15, 0.25), max(cols(0.03, 0.06), 1)
        bottom, x0 = rows(0.65, 0.9), cols(0.0, 0.9)
        lab[max(bottom - h, 0):bottom, x0:x0 + w] = 24
    y0, x0 = rows(0.0, 0.8), cols(0.0, 0.8)
    lab[y0:y0 + rows(0.05, 0.1), x0:x0 + cols(0.05, 0.1)] = 0  # unlabeled
    lab[height - max(rows(0.05, 0.1), 1):] = 1  # ego vehicle
    return lab


def make_synthetic_cityscapes(root: Path, *, n_train: int = 6, n_val: int = 3,
                              size: tuple[int, int] = (256, 512), seed: int = 0,
                              cities: Sequence[str] = ("aachen", "bochum"), train_ids: bool = True) -> Path:
    """Write a tiny dataset in Cityscapes' exact layout, with real label ids; deterministic from ``seed``.

    Each label id has its own mean colour (plus noise), so a small model can learn the classes.
    """
    root = Path(root)
    height, width = size
    for split_no, (split, count) in enumerate((("train", n_train), ("val", n_val))):
        for i in range(count):
            rng = np.random.default_rng([seed, split_no, i])
            city = cities[i % len(cities)]
            base = f"{city}_{i // len(cities):06d}_000019"
            lab = _synthetic_label_ids(rng, height, width)
            noise = rng.normal(0.0, 16.0, (height, width, 3)) + rng.uniform(-15, 15)
            image = np.clip(_SYNTH_COLOURS[lab] + noise, 0, 255).astype(np.uint8)
            img_dir = root / "leftImg8bit" / split / city
            gt_dir = root / "gtFine" / split / city
            img_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(img_dir / f"{base}{IMAGE_SUFFIX}")
            Image.fromarray(lab).save(gt_dir / f"{base}{LABEL_IDS_SUFFIX}")
            if train_ids:
                Image.fromarray(to_train_ids(lab)).save(gt_dir / f"{base}{TRAIN_IDS_SUFFIX}")
    return root
