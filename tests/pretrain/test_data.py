"""Unlabelled image discovery, reproducible two-view sampling and global-batch splitting."""

import pytest
import torch
from PIL import Image

from moca_eval.errors import DatasetError
from moca_eval.pretrain.augment import TwoViews
from moca_eval.pretrain.data import GlobalBatchSampler, TwoViewDataset, find_images


def test_find_images_is_recursive_sorted_and_ignores_other_files(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for rel in ("b/2.png", "a/deep/1.JPEG", "top.jpg"):
        Image.new("RGB", (8, 8)).save(tmp_path / rel, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a/deep/1.JPEG", "b/2.png", "top.jpg"]


def test_find_images_prefers_the_train_split_of_an_imagefolder_root(tmp_path):
    for split in ("train", "val"):
        (tmp_path / split / "n01").mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(tmp_path / split / "n01" / f"{split}.png")
    assert [p.name for p in find_images(tmp_path)] == ["train.png"]


def test_find_images_errors_name_the_folder(tmp_path):
    with pytest.raises(DatasetError, match="no such directory"):
        find_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="empty: no image files"):
        find_images(tmp_path / "empty")


def test_views_are_reproducible_per_seed_epoch_and_image(image_dir):
    dataset = TwoViewDataset(find_images(image_dir), TwoViews(32), seed=3)
    v1, v2 = dataset[5]
    assert v1.shape == (3, 32, 32) and not torch.equal(v1, v2)  # two different pipelines
    torch.rand(100)  # the global generator state does not matter
    assert all(torch.equal(a, b) for a, b in zip(dataset[5], (v1, v2)))
    dataset.epoch = 1
    assert not torch.equal(dataset[5][0], v1)


def test_corrupt_image_is_a_dataset_error(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    dataset = TwoViewDataset(find_images(tmp_path), TwoViews(32))
    with pytest.raises(DatasetError, match="bad.png: cannot decode"):
        dataset[0]


def test_two_processes_see_exactly_the_one_process_batches():
    single = list(GlobalBatchSampler(22, global_batch=8, seed=1))
    ranks = [list(GlobalBatchSampler(22, global_batch=8, rank=r, world_size=2, seed=1)) for r in (0, 1)]
    assert len(single) == 2  # the incomplete third batch is dropped
    for step, batch in enumerate(single):
        assert ranks[0][step] + ranks[1][step] == batch
    all_ids = [i for batch in single for i in batch]
    assert len(set(all_ids)) == 16


def test_sampler_epochs_reshuffle_and_repeat():
    sampler = GlobalBatchSampler(20, global_batch=5, seed=0)
    first = list(sampler)
    sampler.set_epoch(1)
    second = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) == first and second != first
