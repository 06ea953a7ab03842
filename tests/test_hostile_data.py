"""Issue 16, datasets, split files and the feature cache: broken or careless input is one line
and exit 2 (or a loud warning where it can be legitimate); stale or damaged cache entries are
never used; an extraction killed at any point resumes to the same features."""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hostile import fails_with_one_line, knn_args
from PIL import Image

from moca_eval import data as data_module
from moca_eval.checkpoints import load_backbone
from moca_eval.cli import main
from moca_eval.data import eval_transform, load_split
from moca_eval.demo import make_demo_data
from moca_eval.feature_cache import cache_key
from moca_eval.features import ExtractConfig, extract_features

REFUSED_PATH = r"leaves the dataset root"


@pytest.fixture()
def data(tiny_demo_data: Path, tmp_path: Path) -> Path:
    """A private, writable copy of the demo data (10 classes, 6 train + 3 val JPEGs each)."""
    return Path(shutil.copytree(tiny_demo_data, tmp_path / "data"))


@pytest.fixture()
def bmp_data(tiny_demo_data: Path, tmp_path: Path) -> Path:
    """The demo data as BMP files: every image has the same byte size."""
    out = tmp_path / "bmp"
    for jpeg in sorted(tiny_demo_data.rglob("*.JPEG")):
        target = out / jpeg.relative_to(tiny_demo_data).with_suffix(".bmp")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.open(jpeg).convert("RGB").save(target)
    return out


def _cfg(cache: Path | None, **kwargs: object) -> ExtractConfig:
    return ExtractConfig(batch_size=8, num_workers=0, device="cpu", cache_dir=cache, **kwargs)


def _features(ckpt: Path, root: Path, cache: Path | None, **kwargs: object) -> np.ndarray:
    backbone = load_backbone(ckpt, img_size=32)
    index = load_split(root, "train")  # a fresh index: nothing remembered between calls
    return extract_features(backbone, index, ["cls"], _cfg(cache, **kwargs)).features["cls"]


# ---- item 8: bad datasets are one line, exit 2 -------------------------------------------------


def test_item08_non_utf8_file_name_is_one_line(data, tiny_checkpoint, tmp_path, capsys) -> None:
    folder = data / "train" / sorted(os.listdir(data / "train"))[0]
    first = sorted(folder.iterdir())[0]
    os.rename(first, os.fsencode(folder) + b"/bad\xff.JPEG")
    message = fails_with_one_line(knn_args(tiny_checkpoint, data, tmp_path), capsys,
                                  intact=(data, tiny_checkpoint))
    assert message == f"{folder}: the name b'bad\\xff.JPEG' is not valid UTF-8 (rename it, e.g. with convmv)"
    assert not (tmp_path / "out").exists()


def test_item08_non_utf8_class_name_is_one_line(data, tiny_checkpoint, tmp_path, capsys) -> None:
    folder = data / "train" / sorted(os.listdir(data / "train"))[0]
    os.rename(folder, os.fsencode(data / "train") + b"/cl\xe9ss")
    message = fails_with_one_line(knn_args(tiny_checkpoint, data, tmp_path), capsys,
                                  intact=(data, tiny_checkpoint))
    assert message == (f"{data / 'train'}: the name b'cl\\xe9ss' is not valid UTF-8 (rename it, e.g. with "
                       "convmv)")


def test_item08_unreadable_class_folder_is_one_line(data, tiny_checkpoint, tmp_path, capsys,
                                                    monkeypatch) -> None:
    """The folder refuses listing as it would for a user without read permission (the tests run as
    root, whom permissions do not stop, so the refusal is made by ``os.scandir`` itself)."""
    folder = data / "val" / sorted(os.listdir(data / "val"))[2]
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == folder:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_scandir(path)

    monkeypatch.setattr(data_module.os, "scandir", scandir)
    message = fails_with_one_line(knn_args(tiny_checkpoint, data, tmp_path), capsys,
                                  intact=(data, tiny_checkpoint))
    assert message == f"{folder}: cannot read the folder (Permission denied)"


def test_item08_every_val_image_undecodable_is_one_line(data, tiny_checkpoint, tmp_path, capsys) -> None:
    for image in (data / "val").rglob("*.JPEG"):
        image.write_bytes(b"not an image")
    message = fails_with_one_line(knn_args(tiny_checkpoint, data, tmp_path), capsys,
                                  intact=(data, tiny_checkpoint))
    assert message.startswith(f"{data / 'val'}: none of its 30 image(s) could be decoded (e.g. ")
    assert not (tmp_path / "out").exists()


def test_item08_split_manifest_that_is_a_json_list(data, tmp_path, capsys) -> None:
    out = tmp_path / "splits"
    assert main(["splits", "make", "--data", str(data), "--shots", "1", "--percent", "--splits", "1",
                 "--out", str(out)]) == 0
    (out / "manifest.json").write_text("[]\n")
    message = fails_with_one_line(["splits", "verify", str(out)], capsys, intact=(out,))
    assert message == f"{out / 'manifest.json'}: not a moca-eval-splits manifest"


# ---- item 9: a content change is never a stale hit ---------------------------------------------


def _replace_keeping_mtime(target: Path, source: Path) -> None:
    """``cp -p source target``: new bytes, same size, the old modification time."""
    stat = target.stat()
    assert source.stat().st_size == stat.st_size
    target.write_bytes(source.read_bytes())
    os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_item09_same_size_replacement_with_mtime_kept_is_recomputed(bmp_data, tiny_checkpoint,
                                                                    tmp_path) -> None:
    cache = tmp_path / "cache"
    before = _features(tiny_checkpoint, bmp_data, cache)
    images = sorted((bmp_data / "train").rglob("*.bmp"))
    _replace_keeping_mtime(images[0], images[-1])

    after = _features(tiny_checkpoint, bmp_data, cache)

    np.testing.assert_array_equal(after, _features(tiny_checkpoint, bmp_data, None))
    np.testing.assert_array_equal(after[0], after[-1])  # the new bytes' features, not the stale ones
    assert not np.array_equal(after[0], before[0])


def test_item09_verify_data_keys_on_content(bmp_data, tiny_checkpoint, tmp_path, caplog) -> None:
    cache = tmp_path / "cache"
    images = sorted((bmp_data / "train").rglob("*.bmp"))
    _features(tiny_checkpoint, bmp_data, cache, verify_data=True)
    os.utime(images[3])  # new times, same bytes: still the content key's entry
    images[4].write_bytes(images[4].read_bytes())
    with caplog.at_level(logging.INFO, logger="moca_eval.feature_cache"):
        _features(tiny_checkpoint, bmp_data, cache, verify_data=True)
    assert "feature cache hit" in caplog.text
    _replace_keeping_mtime(images[0], images[-1])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="moca_eval.feature_cache"):
        after = _features(tiny_checkpoint, bmp_data, cache, verify_data=True)
    assert "feature cache hit" not in caplog.text
    np.testing.assert_array_equal(after[0], after[-1])


def test_item09_default_key_covers_size_mtime_and_ctime(data, tiny_checkpoint) -> None:
    backbone = load_backbone(tiny_checkpoint, img_size=32)
    key = lambda: cache_key(backbone, load_split(data, "train"), eval_transform(32), "cls", "fp32")  # noqa: E731
    image = sorted((data / "train").rglob("*.JPEG"))[0]
    first = key()
    assert key() == first
    stat = image.stat()
    os.chmod(image, 0o600)  # changes the ctime only
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert image.stat().st_mtime_ns == stat.st_mtime_ns and key() != first


# ---- item 10: a failed cache write is a warning -------------------------------------------------


def test_item10_full_cache_disk_is_a_warning_and_evaluation_completes(data, tiny_checkpoint, tmp_path,
                                                                      capsys, caplog, monkeypatch) -> None:
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "savez", full_disk)
    with caplog.at_level(logging.WARNING):
        code = main(knn_args(tiny_checkpoint, data, tmp_path))
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "knn.json").read_text())["protocol"] == "knn"
    assert "cannot write the feature cache entry" in caplog.text
    assert "(No space left on device); continuing without it" in caplog.text
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []  # no temp file, no half entry


# ---- item 13: split files with a BOM or CRLF ----------------------------------------------------


def _split_dir(data: Path, out: Path) -> Path:
    assert main(["splits", "make", "--data", str(data), "--shots", "2", "--percent", "--splits", "1",
                 "--out", str(out)]) == 0
    return out / "imagenet_subsets1" / "2imgs_class.txt"


def test_item13_split_file_with_bom_and_crlf_is_read_as_written(data, tmp_path, capsys) -> None:
    from moca_eval.protocols.splits import Setting, read_split_file

    path = _split_dir(data, tmp_path / "splits")
    plain = read_split_file(path, Setting(shots=2), 1)
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    capsys.readouterr()

    assert read_split_file(path, Setting(shots=2), 1).keys == plain.keys
    assert main(["splits", "stats", str(tmp_path / "splits"), "--data", str(data)]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if "2imgs_class.txt" in ln)
    assert row.split() == ["imagenet_subsets1/2imgs_class.txt", "2-shot", "1", "20", "10", "2", "2"]


def test_item13_other_odd_characters_are_named(data, tmp_path, capsys) -> None:
    path = _split_dir(data, tmp_path / "splits")
    lines = path.read_text().splitlines()
    lines[3] = lines[3][:4] + "\x00" + lines[3][4:]
    path.write_text("\n".join(lines) + "\n")
    argv = ["splits", "stats", str(tmp_path / "splits"), "--data", str(data)]
    message = fails_with_one_line(argv, capsys, intact=(data, tmp_path / "splits"))
    assert message == (f"{path}: line 4 holds the unprintable character U+0000 ({lines[3]!r}); a split "
                       "file lists one image name per line")


# ---- item 14: splits make rejects impossible settings ------------------------------------------


@pytest.mark.parametrize(("flag", "value", "expected"), [
    ("--shots", "-1", "--shots -1: shots must be >= 1"),
    ("--shots", "0", "--shots 0: shots must be >= 1"),
    ("--percent", "-5", "--percent -5: percents must be in (0, 100]"),
    ("--percent", "500", "--percent 500: percents must be in (0, 100]"),
    ("--percent", "nan", "--percent nan: percents must be in (0, 100]"),
])
def test_item14_splits_make_rejects_impossible_settings(flag, value, expected, data, tmp_path,
                                                        capsys) -> None:
    other = "--percent" if flag == "--shots" else "--shots"
    argv = ["splits", "make", "--data", str(data), flag, value, other, "--out", str(tmp_path / "splits")]
    assert fails_with_one_line(argv, capsys, intact=(data,)) == expected
    assert not (tmp_path / "splits").exists()


# ---- item 15: the cache validates what it returns ----------------------------------------------


def _rewrite_entry(npz: Path, raw: bytes | None = None, **arrays: np.ndarray) -> None:
    """Replace an entry's npz (``raw`` bytes or ``arrays``) and make its json checksum agree:
    a consistent but wrong entry."""
    from moca_eval.checkpoint_io import sha256_file

    if raw is None:
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        raw = buffer.getvalue()
    npz.write_bytes(raw)
    meta = npz.with_suffix(".json")
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "sha256": sha256_file(npz)}))


def _only_entry(cache: Path) -> Path:
    entries = sorted(cache.glob("*.npz"))
    assert len(entries) == 1
    return entries[0]


@pytest.mark.parametrize("damage", ["wrong-width", "float64", "int-mask", "bad-crc"])
def test_item15_consistent_but_wrong_entry_is_rebuilt(damage, data, tiny_checkpoint, tmp_path,
                                                      caplog) -> None:
    cache = tmp_path / "cache"
    good = _features(tiny_checkpoint, data, cache)
    npz = _only_entry(cache)
    present = np.ones(len(good), dtype=bool)
    if damage == "wrong-width":
        _rewrite_entry(npz, features=np.zeros((len(good), 7), np.float32), present=present)
    elif damage == "float64":
        _rewrite_entry(npz, features=good.astype(np.float64), present=present)
    elif damage == "int-mask":
        _rewrite_entry(npz, features=good, present=present.astype(np.int64))
    else:
        raw = bytearray(npz.read_bytes())
        offset = raw.index(good.tobytes()[:64])
        raw[offset + 5] ^= 0xFF  # inside the stored array: the zip member's CRC no longer matches
        _rewrite_entry(npz, bytes(raw))
    with caplog.at_level(logging.WARNING, logger="moca_eval.feature_cache"):
        again = _features(tiny_checkpoint, data, cache)
    np.testing.assert_array_equal(again, good)
    assert "is corrupt or stale" in caplog.text and "rebuilding" in caplog.text
    assert _features(tiny_checkpoint, data, cache).tobytes() == good.tobytes()  # the rebuilt entry is sound


# ---- item 18: splits outside the root, val == train ---------------------------------------------


def test_item18_train_split_outside_the_dataset_root_refused(data, tiny_checkpoint, tmp_path, capsys) -> None:
    shutil.copytree(data / "train", tmp_path / "x")  # a readable ImageFolder right outside the root
    argv = [*knn_args(tiny_checkpoint, data, tmp_path), "--train-split", "../x"]
    message = fails_with_one_line(argv, capsys, intact=(data, tmp_path / "x"))
    assert message == f"{data}: split '../x' {REFUSED_PATH} (give the name of a folder inside {data})"
    argv = [*knn_args(tiny_checkpoint, data, tmp_path), "--val-split", str(tmp_path / "x")]
    assert REFUSED_PATH in fails_with_one_line(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_item18_val_split_train_is_a_loud_warning(data, tiny_checkpoint, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="moca_eval.pipeline"):
        code = main([*knn_args(tiny_checkpoint, data, tmp_path), "--val-split", "train"])
    assert code == 0
    assert ("--val-split train is the training split train: the accuracy reported is on the training "
            "images, not held-out ones") in caplog.text


# ---- item 19: an extraction killed at any point resumes to the same features ---------------------


def _extract_argv(ckpt: Path, root: Path, cache: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "moca_eval", "extract", "--ckpt", str(ckpt), "--data", str(root),
            "--split", "train", "--feature", "cls", "--img-size", "32", "--device", "cpu",
            "--num-workers", "0", "--batch-size", "4", "--shard-images", "8", "--cache-dir", str(cache),
            "--output", str(out)]


def _shards(cache: Path) -> int:
    return len(list(cache.glob("partial/*/shard-*.json")))


def _kill_after(argv: list[str], cache: Path, shards: int, rng: random.Random) -> int:
    """Start ``argv``, SIGKILL it once ``shards`` shards exist (plus a random few ms)."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None and _shards(cache) < shards:
            time.sleep(0.001)
        time.sleep(rng.uniform(0, 0.01))
        proc.send_signal(signal.SIGKILL)
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.slow
def test_item19_extraction_killed_at_random_points_resumes_to_identical_features(tiny_checkpoint,
                                                                                 tmp_path) -> None:
    root = make_demo_data(tmp_path / "data", train_per_class=60, val_per_class=1, image_size=32)
    (root / "train" / "n00000003" / "n00000003_0007.JPEG").write_bytes(b"broken")  # skipped, kept skipped
    reference = tmp_path / "reference.npz"
    subprocess.run(_extract_argv(tiny_checkpoint, root, tmp_path / "ref-cache", reference), check=True,
                   capture_output=True, timeout=300)
    rng = random.Random(16)
    cache = tmp_path / "cache"
    out = tmp_path / "resumed.npz"
    argv = _extract_argv(tiny_checkpoint, root, cache, out)
    resumed_from = []
    for shards in sorted(rng.sample(range(1, 60), 3)):  # 600 images: 75 shards of 8
        assert _kill_after(argv, cache, shards, rng) == -signal.SIGKILL
        assert not out.exists()
        resumed_from.append(_shards(cache))
        assert resumed_from[-1] >= shards
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "resuming feature extraction after" in done.stderr

    with np.load(reference) as ref, np.load(out) as got:
        for name in ("features", "labels", "paths", "classes"):
            np.testing.assert_array_equal(got[name], ref[name])
        assert ref["features"].shape == (599, 32)
    left = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))
    assert not any(p.endswith(".tmp") or p.startswith("partial/") for p in left), left
    assert len([p for p in left if p.endswith(".npz")]) == 1


def test_item19_temp_files_of_a_killed_write_are_removed_by_the_rerun(data, tiny_checkpoint,
                                                                     tmp_path) -> None:
    from moca_eval.feature_shards import ShardStore

    cache = tmp_path / "cache"
    good = _features(tiny_checkpoint, data, cache)
    entry = _only_entry(cache)
    key = entry.stem
    entry.unlink()  # the entry's write was killed: only its temp file and a shard's are left
    (cache / f".{key}.npz.k1ll3d.tmp").write_bytes(b"half an npz")
    partial = ShardStore(cache, {"cls": key}, rank=0, world_size=1).dir
    partial.mkdir(parents=True)
    (partial / ".shard-00000.npz.k1ll3d.tmp").write_bytes(b"half a shard")

    again = _features(tiny_checkpoint, data, cache)

    np.testing.assert_array_equal(again, good)
    left = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))
    assert left == [f"{key}.json", f"{key}.npz"]


def test_item19_shard_images_below_1_refused(data, tiny_checkpoint, tmp_path, capsys) -> None:
    argv = knn_args(tiny_checkpoint, data, tmp_path, "--shard-images", "0")
    message = fails_with_one_line(argv, capsys, intact=(data, tiny_checkpoint))
    assert message == "--shard-images must be >= 1, got 0"
    assert not (tmp_path / "cache").exists()
