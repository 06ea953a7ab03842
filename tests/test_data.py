"""ImageFolder indexing, eval transforms, undecodable images and the demo dataset."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moca_eval.checkpoints import LoadedBackbone
from moca_eval.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageDataset,
    collate_skip_bad,
    eval_transform,
    load_split,
    open_rgb,
    scan_image_folder,
)
from moca_eval.demo import make_demo_data, wnid
from moca_eval.errors import DatasetError
from moca_eval.features import ExtractConfig, compute_features, extract_features
from moca_eval.models import ArchSpec, build_vit


def _touch(root: Path, *relpaths: str) -> None:
    for rel in relpaths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")


# --- scanning ---------------------------------------------------------------------------------


def test_scan_sorts_classes_and_files_and_ignores_non_images(tmp_path: Path) -> None:
    _touch(tmp_path, "b/2.png", "b/10.png", "b/1.png", "a/x.JPEG", "a/notes.txt", "a/.DS_Store", "c/y.jpg")
    index = scan_image_folder(tmp_path)
    assert index.classes == ["a", "b", "c"]
    assert index.relpaths() == ["a/x.JPEG", "b/1.png", "b/10.png", "b/2.png", "c/y.jpg"]
    assert index.labels == [0, 1, 1, 1, 2]
    assert [path for path, _ in index.samples] == [tmp_path / rel for rel in index.relpaths()]


def test_scan_with_given_classes_labels_by_that_list(tmp_path: Path) -> None:
    _touch(tmp_path, "a/1.png", "c/1.png", "c/2.png")
    index = scan_image_folder(tmp_path, classes=["c", "b", "a"])
    assert index.classes == ["c", "b", "a"]  # the given list, including the absent "b"
    assert index.relpaths() == ["a/1.png", "c/1.png", "c/2.png"]  # order still by folder name
    assert index.labels == [2, 0, 0]


def test_load_split_labels_val_with_train_classes(tmp_path: Path) -> None:
    _touch(tmp_path, "train/a/1.png", "train/b/1.png", "train/c/1.png", "val/c/1.png", "val/a/1.png")
    train = load_split(tmp_path, "train")
    val = load_split(tmp_path, "val", classes=train.classes)
    assert val.classes == ["a", "b", "c"]
    assert list(zip(val.relpaths(), val.labels)) == [("a/1.png", 0), ("c/1.png", 2)]


def test_subset_keeps_rows_in_the_given_order(tmp_path: Path) -> None:
    _touch(tmp_path, "a/1.png", "a/2.png", "b/1.png")
    index = scan_image_folder(tmp_path)
    sub = index.subset([2, 0])
    assert (sub.relpaths(), sub.labels, sub.classes) == (["b/1.png", "a/1.png"], [1, 0], ["a", "b"])


# --- data errors ------------------------------------------------------------------------------


def test_missing_dataset_directory_is_a_dataset_error(tmp_path: Path) -> None:
    missing = re.escape(str(tmp_path / "nope"))
    with pytest.raises(DatasetError, match=rf"^{missing}: no such dataset directory$"):
        load_split(tmp_path / "nope", "train")


def test_missing_split_folder_lists_what_is_there(tmp_path: Path) -> None:
    _touch(tmp_path, "train/a/1.png", "test/a/1.png")
    root = re.escape(str(tmp_path))
    with pytest.raises(DatasetError, match=rf"^{root}: no 'val' split folder \(found: test, train; "
                       rf"expected {root}/val/<class>/<image>\)$"):
        load_split(tmp_path, "val")


def test_dataset_directory_without_splits_says_nothing_found(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no 'train' split folder \(found: nothing; "):
        load_split(tmp_path, "train")


def test_missing_split_directory_in_scan_is_a_dataset_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"/val: no such directory \(expected <split>/<class>/<image>"):
        scan_image_folder(tmp_path / "val")


def test_directory_with_images_but_no_class_folders_is_an_error(tmp_path: Path) -> None:
    _touch(tmp_path, "train/1.png", "train/2.png")
    with pytest.raises(DatasetError, match=r"/train: no class folders \(expected .*/train/<class>/<image>\)"):
        load_split(tmp_path, "train")


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    _touch(tmp_path, "a/1.png")
    (tmp_path / "b").mkdir()
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(tmp_path / 'b'))}: empty class folder \(no "
                       r"\.jpg/\.jpeg/.*files\)$"):
        scan_image_folder(tmp_path)


def test_class_folder_with_only_non_images_counts_as_empty(tmp_path: Path) -> None:
    _touch(tmp_path, "a/1.png", "b/readme.txt")
    with pytest.raises(DatasetError, match=r"/b: empty class folder"):
        scan_image_folder(tmp_path)


def test_val_class_not_in_train_classes_is_named(tmp_path: Path) -> None:
    _touch(tmp_path, "train/a/1.png", "train/b/1.png", "val/a/1.png", "val/zebra/1.png")
    train = load_split(tmp_path, "train")
    with pytest.raises(DatasetError, match=r"/val: class folder\(s\) not in the training classes: zebra$"):
        load_split(tmp_path, "val", classes=train.classes)


# --- transforms and decoding ------------------------------------------------------------------


def _normalised(rgb: tuple[int, int, int]) -> torch.Tensor:
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(rgb, IMAGENET_MEAN, IMAGENET_STD)])


def test_eval_transform_resizes_crops_and_normalises_a_solid_image() -> None:
    out = eval_transform(32)(Image.new("RGB", (64, 48), (255, 0, 128)))
    assert out.shape == (3, 32, 32)
    assert out.dtype == torch.float32
    expected = _normalised((255, 0, 128))  # (2.2489, -2.0357, 0.4265)
    assert torch.allclose(out, expected[:, None, None].expand(3, 32, 32), atol=1e-5)


def test_eval_transform_default_resize_is_crop_over_0875() -> None:
    assert eval_transform(224).transforms[0].size == 256
    assert eval_transform(32).transforms[0].size == 37  # round(32 / 0.875)
    assert eval_transform(32, resize=40).transforms[0].size == 40


def test_eval_transform_takes_the_centre_crop() -> None:
    img = Image.new("RGB", (64, 32), (0, 0, 0))
    img.paste((255, 255, 255), (32, 0, 64, 32))  # right half white
    out = eval_transform(32, resize=32)(img)  # no resize (shorter side is 32): crop columns 16..47
    assert torch.allclose(out[:, :, :16], _normalised((0, 0, 0))[:, None, None].expand(3, 32, 16), atol=1e-5)
    assert torch.allclose(out[:, :, 16:], _normalised((255, 255, 255))[:, None, None].expand(3, 32, 16),
                          atol=1e-5)


def test_open_rgb_converts_modes_and_returns_none_for_undecodable(tmp_path: Path) -> None:
    Image.new("L", (8, 8), 200).save(tmp_path / "gray.png")
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    gray = open_rgb(tmp_path / "gray.png")
    assert gray is not None and gray.mode == "RGB" and gray.getpixel((0, 0)) == (200, 200, 200)
    assert open_rgb(tmp_path / "junk.jpg") is None


def test_collate_skip_bad_drops_undecodable_rows() -> None:
    a, b = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    images, rows, bad = collate_skip_bad([(a, 0), (None, 1), (b, 2)])
    assert images.shape == (2, 3, 4, 4) and torch.equal(images[1], b)
    assert rows.tolist() == [0, 2]
    assert bad == [1]


# --- undecodable images through feature extraction --------------------------------------------

ARCH = ArchSpec(embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=32)


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("small") / "data", num_classes=3, train_per_class=3,
                          val_per_class=1, image_size=32)


@pytest.fixture(scope="module")
def tiny_backbone() -> LoadedBackbone:
    torch.manual_seed(0)
    return LoadedBackbone(model=build_vit(ARCH).eval(), format="test", family="moca", arch=ARCH,
                          sha256="0" * 64, path=Path("tiny.pth"), dropped=(), pos_embed="learned")


@pytest.fixture()
def corrupt_split(small_data: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """The small train split with one garbage file and one truncated JPEG."""
    split = tmp_path / "train"
    shutil.copytree(small_data / "train", split)
    garbage = f"{wnid(0)}/{wnid(0)}_0001.JPEG"
    truncated = f"{wnid(2)}/{wnid(2)}_0000.JPEG"
    (split / garbage).write_bytes(b"\xff\xd8 this is not a jpeg")
    data = (split / truncated).read_bytes()
    (split / truncated).write_bytes(data[: len(data) // 2])
    return split, [garbage, truncated]


CPU = ExtractConfig(batch_size=4, num_workers=0, device="cpu", precision="fp32")


def test_corrupt_images_are_skipped_with_a_warning_listing_them(
    corrupt_split: tuple[Path, list[str]], tiny_backbone: LoadedBackbone, caplog: pytest.LogCaptureFixture
) -> None:
    split, bad = corrupt_split
    index = scan_image_folder(split)
    with caplog.at_level(logging.WARNING, logger="moca_eval.features"):
        feats = extract_features(tiny_backbone, index, ["cls"], CPU)

    good = [rel for rel in index.relpaths() if rel not in bad]
    assert feats.skipped == bad
    assert feats.paths == good and len(feats) == 7
    assert feats.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"skipped 2 undecodable image(s) in {split}: {bad[0]}, {bad[1]}"]
    transform = eval_transform(32)
    batch = torch.stack([transform(Image.open(split / rel).convert("RGB")) for rel in good])
    expected = compute_features(tiny_backbone.model, batch, ["cls"])["cls"].numpy()
    np.testing.assert_allclose(feats.features["cls"], expected, atol=1e-5)


def test_corrupt_image_with_strict_is_a_dataset_error_naming_it(
    corrupt_split: tuple[Path, list[str]], tiny_backbone: LoadedBackbone
) -> None:
    split, bad = corrupt_split
    index = scan_image_folder(split)
    strict = ExtractConfig(batch_size=4, num_workers=0, device="cpu", precision="fp32", strict=True)
    with pytest.raises(DatasetError, match=rf"^{re.escape(str(split))}: cannot decode 2 image\(s\): "
                       rf"{re.escape(bad[0])}, {re.escape(bad[1])}$"):
        extract_features(tiny_backbone, index, ["cls"], strict)


def test_strict_also_fails_when_the_features_come_from_the_cache(
    corrupt_split: tuple[Path, list[str]], tiny_backbone: LoadedBackbone, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    split, bad = corrupt_split
    index = scan_image_folder(split)
    cache = tmp_path / "cache"
    lenient = ExtractConfig(batch_size=4, num_workers=0, device="cpu", precision="fp32", cache_dir=cache)
    assert extract_features(tiny_backbone, index, ["cls"], lenient).skipped == bad

    def no_backbone(*args, **kwargs):
        raise AssertionError("the cached features should have been used")

    monkeypatch.setattr("moca_eval.features._run_backbone", no_backbone)
    strict = ExtractConfig(batch_size=4, num_workers=0, device="cpu", precision="fp32", cache_dir=cache,
                           strict=True)
    with pytest.raises(DatasetError, match=rf"cannot decode 2 image\(s\): {re.escape(bad[0])}"):
        extract_features(tiny_backbone, index, ["cls"], strict)


def test_image_dataset_yields_none_for_undecodable_rows(corrupt_split: tuple[Path, list[str]]) -> None:
    split, bad = corrupt_split
    index = scan_image_folder(split)
    dataset = ImageDataset(index, eval_transform(32), rows=[0, 1, 2])
    items = [dataset[i] for i in range(len(dataset))]
    assert [row for _, row in items] == [0, 1, 2]
    assert [img is None for img, _ in items] == [False, True, False]  # row 1 is bad[0]
    assert index.relpaths()[1] == bad[0]


# --- demo data --------------------------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_demo_data_is_byte_identical_for_a_seed_and_imagenet_shaped(tmp_path: Path) -> None:
    first = _tree(make_demo_data(tmp_path / "a", seed=3, train_per_class=2, val_per_class=1, image_size=32))
    second = _tree(make_demo_data(tmp_path / "b", seed=3, train_per_class=2, val_per_class=1, image_size=32))
    other = _tree(make_demo_data(tmp_path / "c", seed=4, train_per_class=2, val_per_class=1, image_size=32))

    assert first == second
    images = [rel for rel in first if rel.endswith(".JPEG")]
    assert images != [] and all(first[rel] != other[rel] for rel in images)
    folders = [f"n{i:08d}" for i in range(1, 11)]
    expected = sorted([f"train/{c}/{c}_{j:04d}.JPEG" for c in folders for j in range(2)]
                      + [f"val/{c}/{c}_0000.JPEG" for c in folders])
    assert sorted(images) == expected  # 10 classes x (2 train + 1 val)
    assert set(first) == {*expected, "classes.txt"}
    assert first["classes.txt"].decode().splitlines()[:2] == ["n00000001\tcircle", "n00000002\tsquare"]
    with Image.open(tmp_path / "a" / images[0]) as img:
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 32))


def test_demo_data_loads_as_train_and_val_splits(tmp_path: Path) -> None:
    root = make_demo_data(tmp_path, num_classes=4, train_per_class=3, val_per_class=2, image_size=32)
    train = load_split(root, "train")
    val = load_split(root, "val", classes=train.classes)
    assert train.classes == [wnid(i) for i in range(4)]
    assert (len(train), len(val)) == (12, 8)
    assert np.bincount(val.labels).tolist() == [2, 2, 2, 2]
