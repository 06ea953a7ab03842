"""Cityscapes layout, label-id -> trainId conversion, French et al. low-shot splits, split files."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moca_eval.errors import ConfigError, DatasetError
from moca_eval.segmentation import cityscapes as cs

SIZE = (32, 64)


@pytest.fixture
def synth(tmp_path: Path) -> Path:
    return cs.make_synthetic_cityscapes(tmp_path / "cs", n_train=4, n_val=2, size=SIZE, train_ids=False)


def _fake_train_names(n: int = cs.FULL_TRAIN_COUNT) -> list[str]:
    cities = ["aachen", "bochum", "bremen", "cologne", "darmstadt", "dusseldorf", "erfurt", "hamburg",
              "hanover", "jena", "krefeld", "monchengladbach", "strasbourg", "stuttgart", "tubingen",
              "ulm", "weimar", "zurich"]
    return [f"{cities[i % 18]}/{cities[i % 18]}_{i // 18:06d}_{(7 * i) % 1000:06d}" for i in range(n)]


def test_classes_palette_and_official_ids():
    assert len(cs.CLASSES) == len(cs.PALETTE) == 19
    assert cs.CLASSES[0] == "road" and cs.CLASSES[13] == "car" and cs.CLASSES[18] == "bicycle"
    assert cs.PALETTE[0] == (128, 64, 128) and cs.PALETTE[10] == (70, 130, 180)
    expected = {7: 0, 8: 1, 11: 2, 17: 5, 21: 8, 23: 10, 24: 11, 26: 13, 31: 16, 33: 18,
                0: 255, 1: 255, 9: 255, 18: 255, 29: 255, 30: 255}
    assert {k: cs.ID_TO_TRAIN_ID[k] for k in expected} == expected
    assert set(cs.ID_TO_TRAIN_ID) == set(range(34)) | {-1} and cs.ID_TO_TRAIN_ID[-1] == 255
    assert sorted(v for v in cs.ID_TO_TRAIN_ID.values() if v != 255) == list(range(19))


def test_to_train_ids():
    ids = np.array([[7, 8, 11, 26], [33, 0, 34, 255]], dtype=np.uint8)
    out = cs.to_train_ids(ids)
    assert out.dtype == np.uint8
    assert out.tolist() == [[0, 1, 2, 13], [18, 255, 255, 255]]
    signed = cs.to_train_ids(np.array([-1, 7, 300, 33], dtype=np.int32))
    assert signed.dtype == np.uint8 and signed.tolist() == [255, 0, 255, 18]


def test_image_stem():
    assert cs.image_stem("leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png") == \
        "aachen/aachen_000000_000019"
    assert cs.image_stem(Path("gtFine/val/lindau/lindau_000001_000019_gtFine_labelTrainIds.png")) == \
        "lindau/lindau_000001_000019"
    with pytest.raises(DatasetError, match="not a Cityscapes file name"):
        cs.image_stem("x/photo.png")


def test_synthetic_layout_and_determinism(tmp_path: Path):
    root = cs.make_synthetic_cityscapes(tmp_path / "a", n_train=4, n_val=2, size=SIZE, seed=3)
    again = cs.make_synthetic_cityscapes(tmp_path / "b", n_train=4, n_val=2, size=SIZE, seed=3)
    image = root / "leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png"
    label = root / "gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png"
    with Image.open(image) as img, Image.open(label) as lab:
        assert img.mode == "RGB" and img.size == (64, 32) and lab.mode == "L"
        ids = np.asarray(lab)
    assert {0, 1, 7, 11, 23} <= set(np.unique(ids).tolist())
    for rel in ("leftImg8bit/train/bochum/bochum_000001_000019_leftImg8bit.png",
                "gtFine/val/bochum/bochum_000000_000019_gtFine_labelTrainIds.png"):
        assert (root / rel).read_bytes() == (again / rel).read_bytes()
    assert len(cs.list_pairs(root, "train")) == 4 and len(cs.list_pairs(root, "val")) == 2
    assert cs.train_names(root) == ["aachen/aachen_000000_000019", "aachen/aachen_000001_000019",
                                    "bochum/bochum_000000_000019", "bochum/bochum_000001_000019"]


def test_synthetic_colours_follow_the_class(tmp_path: Path):
    root = cs.make_synthetic_cityscapes(tmp_path / "cs", n_train=2, n_val=0, size=(64, 128))
    image, label = cs.list_pairs(root, "train")[0]
    rgb = np.asarray(Image.open(image)).astype(float)
    train_ids = np.asarray(Image.open(label))
    road, sky = rgb[train_ids == 0].mean(0), rgb[train_ids == 10].mean(0)
    assert np.abs(road - cs.PALETTE[0]).max() < 25 and np.abs(sky - cs.PALETTE[10]).max() < 25


def test_prepare_writes_only_missing_files(synth: Path):
    labels = sorted(synth.glob("gtFine/*/*/*_gtFine_labelIds.png"))
    assert len(labels) == 6 and not list(synth.glob("gtFine/*/*/*_labelTrainIds.png"))
    with pytest.raises(DatasetError, match="seg prepare"):
        cs.list_pairs(synth, "train")
    assert cs.prepare_train_ids(synth, progress=False) == 6
    for src in labels:
        dst = src.with_name(src.name.replace("_labelIds", "_labelTrainIds"))
        with Image.open(src) as a, Image.open(dst) as b:
            assert b.mode == "L"
            np.testing.assert_array_equal(np.asarray(b), cs.to_train_ids(np.asarray(a)))
    assert not list(synth.rglob("*.tmp"))
    assert cs.prepare_train_ids(synth, progress=False) == 0

    gone = labels[1].with_name(labels[1].name.replace("_labelIds", "_labelTrainIds"))
    gone.unlink()
    others = {p: p.stat().st_mtime_ns for p in synth.glob("gtFine/*/*/*_labelTrainIds.png")}
    assert cs.prepare_train_ids(synth, progress=False) == 1 and gone.is_file()
    assert {p: p.stat().st_mtime_ns for p in others} == others
    assert cs.prepare_train_ids(synth, splits=("val",), overwrite=True, progress=False) == 2
    assert len(cs.list_pairs(synth, "train")) == 4


def test_prepare_errors(synth: Path, tmp_path: Path):
    bad = next(synth.glob("gtFine/train/*/*_gtFine_labelIds.png"))
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match=re.escape(f"{bad}: cannot decode")):
        cs.prepare_train_ids(synth, progress=False)
    with pytest.raises(DatasetError, match="test.*no such folder"):
        cs.prepare_train_ids(synth, splits=("test",), progress=False)
    with pytest.raises(DatasetError, match="no such Cityscapes directory"):
        cs.prepare_train_ids(tmp_path / "nowhere", progress=False)


def test_list_pairs_errors(synth: Path, tmp_path: Path):
    cs.prepare_train_ids(synth, progress=False)
    missing = next(synth.glob("gtFine/train/bochum/*_labelTrainIds.png"))
    missing.unlink()
    with pytest.raises(DatasetError) as err:
        cs.list_pairs(synth, "train")
    msg = str(err.value)
    assert msg.startswith(f"{missing}: no such label file") and "1 of 4 train images" in msg
    assert f"moca-eval seg prepare --data {synth}" in msg and "_gtFine_labelIds.png" in msg
    assert "\n" not in msg

    missing.with_name(missing.name.replace("_labelTrainIds", "_labelIds")).unlink()
    with pytest.raises(DatasetError, match="gtFine_trainvaltest.zip"):
        cs.list_pairs(synth, "train")
    with pytest.raises(DatasetError, match=r"leftImg8bit/test: no such folder \(found: train, val"):
        cs.list_pairs(synth, "test")
    with pytest.raises(DatasetError, match="no such Cityscapes directory"):
        cs.list_pairs(tmp_path / "nowhere", "train")
    empty = tmp_path / "empty"
    (empty / "leftImg8bit" / "train" / "aachen").mkdir(parents=True)
    with pytest.raises(DatasetError, match="leftImg8bit/train: no <city>/\\*_leftImg8bit.png images"):
        cs.list_pairs(empty, "train")
    with pytest.raises(DatasetError, match="no <city>"):
        cs.train_names(empty)


def _reference_split(names: list[str], size: int, seed: int) -> list[str]:
    """French et al. 2020, written out independently: sorted list, seeded permutation, first N."""
    ordered = sorted(names)
    perm = np.random.RandomState(seed).permutation(len(ordered))
    return [ordered[int(perm[k])] for k in range(size)]


def test_french_split_matches_reference_and_is_nested():
    names = _fake_train_names()
    assert len(names) == cs.FULL_TRAIN_COUNT == 2975 and len(set(names)) == 2975
    shuffled = names[:]
    random.Random(0).shuffle(shuffled)
    assert cs.SPLIT_SEEDS == (12345, 23456, 34567)
    assert cs.TRAIN_SIZES == {"100": 100, "372": 372, "full": None}
    # The legacy RandomState stream is frozen by NumPy: these are the first indices of seed 12345.
    assert np.random.RandomState(12345).permutation(2975)[:5].tolist() == [1687, 2342, 392, 1338, 76]
    splits = {}
    for seed in cs.SPLIT_SEEDS:
        small = cs.french_split(names, 100, seed)
        large = cs.french_split(shuffled, 372, seed)
        assert small == _reference_split(names, 100, seed) == cs.french_split(shuffled, 100, seed)
        assert large == _reference_split(names, 372, seed)
        assert len(set(large)) == 372 and large[:100] == small and set(small) <= set(large)
        splits[seed] = small
    assert splits[12345][0] == sorted(names)[1687]
    assert len({tuple(s) for s in splits.values()}) == 3
    assert len(set(splits[12345]) & set(splits[23456])) < 20
    assert sorted(cs.french_split(names, 2975, 12345)) == sorted(names)
    for size in (0, 2976):
        with pytest.raises(ConfigError, match="split size"):
            cs.french_split(names, size, 12345)


def test_names_files(tmp_path: Path):
    names = _fake_train_names(10)
    path = tmp_path / "splits" / "100_12345.txt"
    cs.write_names(path, names)
    assert path.read_text().splitlines() == names and not list(path.parent.glob("*.tmp"))
    path.write_text("\n" + path.read_text() + "\n  \n")
    assert cs.read_names(path) == names
    with pytest.raises(DatasetError, match="missing.txt: no such split file"):
        cs.read_names(tmp_path / "missing.txt")

    cs.check_names_known(names[:3], names, path)
    with pytest.raises(DatasetError) as err:
        cs.check_names_known(names[:2] + ["x/a", "x/b"], names, path)
    assert str(err.value) == f"{path}: 2 name(s) not in the dataset: x/a, x/b"
    unknown = [f"x/{i}" for i in range(7)]
    with pytest.raises(DatasetError, match=r"7 name\(s\) not in the dataset: x/0, x/1, x/2, x/3, x/4\.\.\.$"):
        cs.check_names_known(unknown, names, path)
