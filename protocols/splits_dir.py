"""Split directories: load a published or generated one, write one with a manifest, verify it,
and summarise it (per-class counts, overlaps between splits). File format: ``splits.py``."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from moca_eval.errors import DatasetError
from moca_eval.protocols.splits import (
    MANIFEST,
    SHOW,
    DatasetKeys,
    Setting,
    SplitFile,
    check_split_file,
    class_of,
    locate_split_file,
    nesting_warnings,
    read_split_file,
    sha256_file,
)

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "moca-eval-splits"
MANIFEST_VERSION = 1
_NAME = re.compile(r"^imagenet_subsets(\d+)/(?:(\d+)imgs_class|(\d+(?:\.\d+)?)percent)\.txt$")


def discover_split_files(split_dir: str | os.PathLike) -> list[SplitFile]:
    """Every split file of a directory, read (no dataset check), sorted by setting and split.

    A ``3imgs_class.txt`` without a ``5imgs_class.txt`` beside it and with 5 images per
    class is MSN's mislabelled 5-image list and is read as 5-shot.
    """
    root = Path(split_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: split directory does not exist")
    files = []
    for path in sorted(root.glob("imagenet_subsets*/*.txt")):
        rel = path.relative_to(root).as_posix()
        m = _NAME.match(rel)
        if m is None:
            continue
        split = int(m.group(1))
        setting = Setting(shots=int(m.group(2))) if m.group(2) else Setting(
            percent=float(m.group(3)))
        sf = read_split_file(path, setting, split, relpath=rel)
        if setting.shots == 3 and not (path.parent / "5imgs_class.txt").exists():
            counts = Counter(class_of(k) for k in sf.keys).values()
            if sorted(counts)[len(counts) // 2] == 5:
                sf = read_split_file(path, Setting(shots=5), split, relpath=rel)
        files.append(sf)
    if not files:
        raise DatasetError(f"{root}: no split files (imagenet_subsets<k>/<n>imgs_class.txt)")
    return sorted(files, key=lambda f: (f.setting, f.split))


def load_split_dir(split_dir: str | os.PathLike, data: DatasetKeys, settings: Sequence[Setting],
                   n_splits: int, *, allow_short: bool = False) -> tuple[list[SplitFile], list[str]]:
    """Read and check the files for ``settings`` x splits 1..n_splits; returns (files, warnings).

    A missing file is an error, except a percent setting published for fewer splits (the
    public 1% list exists for split 1 only): its found splits are used, with a warning.
    """
    root = Path(split_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: split directory does not exist")
    warnings: list[str] = []
    files: list[SplitFile] = []
    missing: list[str] = []
    for setting in settings:
        found = {s: locate_split_file(root, setting, s) for s in range(1, n_splits + 1)}
        if setting.percent is not None and found[1] is not None and None in found.values():
            lacking = [s for s, p in found.items() if p is None]
            warnings.append(f"{root}: {setting.name} has no file for split(s) "
                            f"{', '.join(map(str, lacking))}; using the others")
            found = {s: p for s, p in found.items() if p is not None}
        for split, path in found.items():
            if path is None:
                missing.append(setting.filename(split))
                continue
            sf = read_split_file(path, setting, split, relpath=path.relative_to(root).as_posix())
            files.append(check_split_file(sf, data, allow_short=allow_short, warnings=warnings))
    if missing:
        raise DatasetError(f"{root}: missing split file(s) {', '.join(missing[:SHOW])}"
                           f"{', ...' if len(missing) > SHOW else ''}")
    _check_against_manifest(root, files)
    warnings.extend(nesting_warnings(files))
    for w in warnings:
        log.warning("%s", w)
    return files, warnings


def _check_against_manifest(root: Path, files: Sequence[SplitFile]) -> None:
    if not (root / MANIFEST).is_file():
        return
    listed = read_manifest(root)["files"]
    for sf in files:
        entry = listed.get(sf.relpath)
        if entry is not None and entry["sha256"] != sf.sha256:
            raise DatasetError(f"{sf.source}: sha256 differs from {root / MANIFEST} "
                               "(file changed after it was made; see `moca-eval splits verify`)")


def build_manifest(files: Sequence[SplitFile], data: DatasetKeys, *, seed: int,
                   settings: Sequence[Setting], n_splits: int, allow_short: bool) -> dict:
    """The manifest of a generated split directory (no paths or times: reproducible bytes)."""
    return {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "seed": seed,
        "splits": n_splits,
        "settings": [s.as_json() for s in settings],
        "allow_short": allow_short,
        "dataset": {"classes": len(data.classes), "images": len(data.keys),
                    "keys_sha256": data.digest()},
        "files": {
            sf.relpath: {**sf.setting.as_json(), "split": sf.split, "images": len(sf.keys),
                         "sha256": sf.sha256, **({"short": sf.short} if sf.short else {})}
            for sf in files
        },
    }


def write_split_dir(out: str | os.PathLike, files: Sequence[SplitFile], manifest: dict) -> Path:
    """Write the files and ``manifest.json`` into ``out`` (absent or empty) all at once.

    Everything is written into a temporary sibling directory first, then renamed: an error
    leaves no partial directory behind.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DatasetError(f"{out}: output directory exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for sf in files:
            path = tmp / sf.relpath
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(sf.text)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_manifest(split_dir: str | os.PathLike) -> dict:
    path = Path(split_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DatasetError(f"{path}: no manifest (only generated split dirs have one)") from e
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: unreadable manifest ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT \
            or not isinstance(manifest.get("files"), dict):
        raise DatasetError(f"{path}: not a {MANIFEST_FORMAT} manifest")
    return manifest


def verify_split_dir(split_dir: str | os.PathLike, data: DatasetKeys | None = None) -> list[str]:
    """Problems found checking a generated directory against its manifest (and the dataset).

    Checks: every listed file exists with the recorded sha256, no unlisted ``.txt`` file, and
    with ``data`` every named image exists (a different dataset listing is only noted).
    """
    root = Path(split_dir)
    manifest = read_manifest(root)
    problems = []
    for rel, entry in sorted(manifest["files"].items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{path}: listed in the manifest but missing")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
        elif data is not None:
            setting = Setting(shots=entry.get("shots"), percent=entry.get("percent"))
            sf = read_split_file(path, setting, entry["split"], relpath=rel)
            try:
                check_split_file(sf, data, allow_short=True)
            except DatasetError as e:
                problems.append(str(e))
    extra = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.txt"))
    problems += [f"{root / r}: not listed in the manifest" for r in extra
                 if r not in manifest["files"]]
    if data is not None and manifest["dataset"]["keys_sha256"] != data.digest():
        log.info("%s: the dataset's file list differs from the one the splits were made from",
                 data.root)
    return problems


def split_stats(files: Sequence[SplitFile],
                classes: Sequence[str]) -> tuple[list[dict], list[dict], list[dict]]:
    """(per-file summary rows, overlap rows between splits of a setting, per-class rows)."""
    per_class: dict[str, dict] = {c: {"class": c} for c in classes}
    summary = []
    for sf in files:
        counts = Counter(class_of(k) for k in sf.keys)
        vals = [counts[c] for c in classes]
        summary.append({"file": sf.relpath, "setting": sf.setting.name, "split": sf.split,
                        "images": len(sf.keys), "classes": sum(v > 0 for v in vals),
                        "min/class": min(vals, default=0), "max/class": max(vals, default=0)})
        for c in classes:
            per_class[c][sf.relpath] = counts[c]
    overlaps = []
    by_setting: dict[Setting, list[SplitFile]] = {}
    for sf in files:
        by_setting.setdefault(sf.setting, []).append(sf)
    for setting, group in sorted(by_setting.items()):
        for i, a in enumerate(group):
            for b in group[i + 1:]:
                common = len(set(a.keys) & set(b.keys))
                overlaps.append({"setting": setting.name, "splits": f"{a.split}&{b.split}",
                                 "shared": common,
                                 "shared %": round(100 * common / max(1, len(a.keys)), 2)})
    return summary, overlaps, list(per_class.values())
