"""Split files: MSN-format round trip, generation (deterministic, nested, stratified), checks."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pytest

from moca_eval.errors import DatasetError
from moca_eval.protocols import splits_dir
from moca_eval.protocols.splits import (
    DatasetKeys,
    Setting,
    check_split_file,
    class_of,
    key_to_line,
    line_to_key,
    locate_split_file,
    make_split_files,
    nesting_warnings,
    parse_split_text,
    read_split_file,
    select_keys,
)

WNIDS = ("n01440764", "n01443537", "n01484850", "n01491361")


def imagenet_like(per_class=(20, 20, 20, 20)) -> DatasetKeys:
    keys = [f"{w}/{w}_{i:04d}.JPEG" for w, n in zip(WNIDS, per_class) for i in range(n)]
    return DatasetKeys(root="/data/train", classes=WNIDS, keys=tuple(keys))


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_msn_lines_round_trip_byte_for_byte(tmp_path):
    # MSN/SimCLR lines: bare ImageNet names, class = prefix before "_"
    text = "n01440764_10026.JPEG\nn01443537_2.JPEG\nn01484850_1000.JPEG\n"
    sf = read_split_file(write(tmp_path / "1imgs_class.txt", text), Setting(shots=1), 1)
    assert sf.keys == ("n01440764/n01440764_10026.JPEG", "n01443537/n01443537_2.JPEG",
                       "n01484850/n01484850_1000.JPEG")
    assert sf.text == text
    import hashlib
    assert sf.sha256 == hashlib.sha256(text.encode()).hexdigest()


def test_non_imagenet_names_are_written_as_relative_paths():
    for key in ("cat/img_001.jpg", "golden_retriever/golden_retriever_1.jpg", "dog/sub/x.png"):
        assert "/" in key_to_line(key)
        assert line_to_key(key_to_line(key)) == key
    assert key_to_line("n0/n0_1.JPEG") == "n0_1.JPEG"
    # CRLF line ends and blank lines are tolerated
    assert parse_split_text("a_1.jpg\r\n\r\nb_2.jpg\r\n", source="f") == ("a/a_1.jpg", "b/b_2.jpg")


def test_empty_and_duplicate_files_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="empty"):
        read_split_file(write(tmp_path / "e.txt", "\n  \n"), Setting(shots=1), 1)
    with pytest.raises(DatasetError, match="listed twice"):
        parse_split_text("n0_1.JPEG\nn0_1.JPEG\n", source="d.txt")


def test_generated_splits_are_stratified_nested_and_seeded():
    data = imagenet_like((20, 17, 30, 9))
    settings = [Setting(shots=1), Setting(shots=2), Setting(shots=5), Setting(percent=25)]
    files = make_split_files(data, settings, 3, seed=7)
    assert len(files) == 12
    by = {(f.setting, f.split): f for f in files}
    for split in (1, 2, 3):
        sets = [set(by[(s, split)].keys) for s in settings]
        assert sets[0] <= sets[1] <= sets[2]  # 1 in 2 in 5
        for c in WNIDS:  # per class, 25% and 5-shot are prefixes of one order: one holds the other
            five, pct = ({k for k in sets[i] if class_of(k) == c} for i in (2, 3))
            assert five <= pct or pct <= five
        for s, keys in zip(settings, sets):
            counts = Counter(class_of(k) for k in keys)
            want = {c: s.shots if s.shots else max(1, int(n * 0.25 + 0.5))
                    for c, n in zip(WNIDS, (20, 17, 30, 9))}
            assert counts == want
    assert nesting_warnings(files) == []
    # different splits draw different images; the same seed redraws the same ones
    assert by[(Setting(shots=5), 1)].keys != by[(Setting(shots=5), 2)].keys
    again = make_split_files(data, settings, 3, seed=7)
    assert [f.text for f in again] == [f.text for f in files]
    other = make_split_files(data, settings, 3, seed=8)
    assert [f.text for f in other] != [f.text for f in files]


def test_selection_ignores_listing_order_and_other_classes():
    data = imagenet_like()
    keys = list(data.keys)
    random.Random(0).shuffle(keys)
    shuffled = DatasetKeys(data.root, data.classes, tuple(keys))
    assert select_keys(shuffled, Setting(shots=5), 2, seed=3) == select_keys(
        data, Setting(shots=5), 2, seed=3)
    fewer = DatasetKeys(data.root, data.classes[:2], tuple(k for k in data.keys
                                                           if class_of(k) in data.classes[:2]))
    assert select_keys(fewer, Setting(shots=2), 1, seed=3) == select_keys(
        data, Setting(shots=2), 1, seed=3)[:4]


def test_short_classes_error_or_are_recorded():
    data = imagenet_like((20, 3, 20, 20))
    with pytest.raises(DatasetError, match=r"1 classes have fewer than 5 .*n01443537 \(3\)"):
        make_split_files(data, [Setting(shots=5)], 1, seed=0)
    (sf,) = make_split_files(data, [Setting(shots=5)], 1, seed=0, allow_short=True)
    assert sf.short == {"n01443537": 3}
    assert len(sf.keys) == 5 + 3 + 5 + 5


def test_names_missing_from_dataset_are_listed_with_count(tmp_path):
    data = imagenet_like()
    lines = [f"{w}_{i:04d}.JPEG" for w in WNIDS for i in range(2)]
    lines[1] = "n01440764_9999.JPEG"
    lines += [f"n09999999_{i}.JPEG" for i in range(7)]
    sf = read_split_file(write(tmp_path / "2imgs_class.txt", "\n".join(lines)), Setting(shots=2), 1)
    with pytest.raises(DatasetError) as err:
        check_split_file(sf, data)
    msg = str(err.value)
    assert "8 of 15 images are not in /data/train" in msg
    assert "n01440764_9999.JPEG, n09999999_0.JPEG" in msg and msg.endswith(", ...")
    assert "\n" not in msg


def test_extra_images_per_class_warn_and_nesting_is_checked():
    data = imagenet_like()
    one, two = (make_split_files(data, [Setting(shots=n)], 1, seed=s)[0]
                for n, s in ((1, 0), (2, 5)))
    assert bool(nesting_warnings([one, two])) == (not set(one.keys) <= set(two.keys))
    bad = type(two)(Setting(shots=2), 1, "imagenet_subsets1/2imgs_class.txt",
                    tuple(k for k in two.keys if k not in one.keys)[:4], "x")
    warns = nesting_warnings([one, bad])
    assert len(warns) == 1 and "not nested" in warns[0]
    three = type(two)(Setting(shots=2), 1, "f", tuple(data.keys[:3]) + two.keys[2:], "x", "f")
    warnings: list[str] = []
    check_split_file(three, data, allow_short=True, warnings=warnings)
    assert any("more than 2 images" in w for w in warnings)


def test_locate_reads_msn_split3_5shot_file(tmp_path):
    write(tmp_path / "imagenet_subsets3/3imgs_class.txt", "n01440764_1.JPEG\n")
    assert locate_split_file(tmp_path, Setting(shots=5), 3).name == "3imgs_class.txt"
    write(tmp_path / "imagenet_subsets3/5imgs_class.txt", "n01440764_1.JPEG\n")
    assert locate_split_file(tmp_path, Setting(shots=5), 3).name == "5imgs_class.txt"
    assert locate_split_file(tmp_path, Setting(shots=2), 3) is None


def test_write_is_deterministic_and_verify_catches_changes(tmp_path):
    data = imagenet_like()
    settings = [Setting(shots=1), Setting(shots=2), Setting(shots=5), Setting(percent=10)]
    dirs = []
    for name in ("a", "b"):
        files = make_split_files(data, settings, 3, seed=1)
        manifest = splits_dir.build_manifest(files, data, seed=1, settings=settings, n_splits=3,
                                             allow_short=False)
        dirs.append(splits_dir.write_split_dir(tmp_path / name, files, manifest))
    listing = sorted(p.relative_to(dirs[0]) for p in dirs[0].rglob("*") if p.is_file())
    assert len(listing) == 13  # 12 split files + manifest
    for rel in listing:
        assert (dirs[0] / rel).read_bytes() == (dirs[1] / rel).read_bytes()
    assert splits_dir.verify_split_dir(dirs[0], data) == []
    target = dirs[0] / "imagenet_subsets2/2imgs_class.txt"
    target.write_text(target.read_text().replace("n01440764", "n01443537", 1))
    write(dirs[0] / "imagenet_subsets9/1imgs_class.txt", "n01440764_0000.JPEG\n")
    problems = splits_dir.verify_split_dir(dirs[0], data)
    assert len(problems) == 2
    assert "sha256 differs" in problems[0] and "not listed" in problems[1]
    gone = files[0].keys[0]
    fewer = DatasetKeys(data.root, data.classes, tuple(k for k in data.keys if k != gone))
    assert any("not in /data/train" in p for p in splits_dir.verify_split_dir(dirs[1], fewer))


def test_write_refuses_non_empty_dir_and_leaves_nothing_on_failure(tmp_path, monkeypatch):
    data = imagenet_like()
    files = make_split_files(data, [Setting(shots=1), Setting(shots=2)], 1, seed=0)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    with pytest.raises(DatasetError, match="not empty"):
        splits_dir.write_split_dir(tmp_path / "full", files, {})

    def boom(self):
        raise OSError("disk full")

    monkeypatch.setattr(type(files[0]), "text", property(boom))
    with pytest.raises(OSError):
        splits_dir.write_split_dir(tmp_path / "new", files, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def test_load_split_dir_published_layout(tmp_path):
    data = imagenet_like()
    gen = make_split_files(data, [Setting(shots=1), Setting(shots=2), Setting(shots=5)], 3,
                           seed=0)
    for sf in gen:  # MSN layout: split 3's 5-shot list is named 3imgs_class.txt
        rel = sf.relpath.replace("subsets3/5imgs", "subsets3/3imgs")
        write(tmp_path / rel, sf.text)
    pct = make_split_files(data, [Setting(percent=10)], 1, seed=0)[0]
    write(tmp_path / pct.relpath, pct.text)
    settings = [Setting(shots=1), Setting(shots=2), Setting(shots=5), Setting(percent=10)]
    files, warnings = splits_dir.load_split_dir(tmp_path, data, settings, 3)
    assert [f.keys for f in files[:9]] == [f.keys for f in sorted(gen, key=lambda f: (
        f.setting, f.split))]
    assert files[8].relpath == "imagenet_subsets3/3imgs_class.txt"
    assert len(files) == 10 and files[9].setting == Setting(percent=10)
    assert len(warnings) == 1 and "split(s) 2, 3" in warnings[0]
    (tmp_path / "imagenet_subsets2/2imgs_class.txt").unlink()
    with pytest.raises(DatasetError, match="missing split file.*imagenet_subsets2/2imgs_class"):
        splits_dir.load_split_dir(tmp_path, data, settings, 3)


def test_load_split_dir_checks_manifest_hashes(tmp_path):
    data = imagenet_like()
    settings = [Setting(shots=1)]
    files = make_split_files(data, settings, 1, seed=0)
    manifest = splits_dir.build_manifest(files, data, seed=0, settings=settings, n_splits=1,
                                         allow_short=False)
    out = splits_dir.write_split_dir(tmp_path / "s", files, manifest)
    loaded, _ = splits_dir.load_split_dir(out, data, settings, 1)
    assert loaded[0].sha256 == manifest["files"]["imagenet_subsets1/1imgs_class.txt"]["sha256"]
    path = out / "imagenet_subsets1/1imgs_class.txt"
    path.write_text("".join(reversed(path.read_text().splitlines(keepends=True))))
    with pytest.raises(DatasetError, match="sha256 differs"):
        splits_dir.load_split_dir(out, data, settings, 1)


def test_stats_counts_and_overlaps_match_set_arithmetic(tmp_path):
    data = imagenet_like((12, 12, 12, 12))
    files = make_split_files(data, [Setting(shots=5)], 3, seed=0)
    summary, overlaps, per_class = splits_dir.split_stats(files, data.classes)
    assert [s["images"] for s in summary] == [20, 20, 20]
    assert all(s["min/class"] == s["max/class"] == 5 for s in summary)
    expect = {f"{a.split}&{b.split}": len(set(a.keys) & set(b.keys))
              for i, a in enumerate(files) for b in files[i + 1:]}
    assert {o["splits"]: o["shared"] for o in overlaps} == expect
    assert per_class[0] == {"class": WNIDS[0], **{f.relpath: 5 for f in files}}
    for sf in files:
        write(tmp_path / sf.relpath, sf.text)
    found = splits_dir.discover_split_files(tmp_path)
    assert [(f.setting, f.split, f.keys) for f in found] == [
        (f.setting, f.split, f.keys) for f in files]
