"""Low-shot split files: read the published MSN/MOCA/SimCLR lists, make new ones, check them.

Format (MSN, MOCA, SimCLR): one image per line, ``nXXXXXXXX_YYYY.JPEG``, its class is the
prefix before the first ``_`` and it lives in ``<train>/<class>/``. Images whose file name
does not start with ``<class>_`` (any other ImageFolder dataset) are written as their path
relative to the train folder, ``<class>/<file>``; the reader accepts both forms. Inside the
harness an image is named by its *key*, the posix path relative to the train folder.

Layout of a split directory (the published one, and what :func:`make_splits` writes)::

    imagenet_subsets{k}/{n}imgs_class.txt    n images per class, split k
    imagenet_subsets{k}/{p}percent.txt       p percent of each class, split k
    manifest.json                            (generated dirs) sha256 of every file

MSN's ``imagenet_subsets3/3imgs_class.txt`` holds the 5-image list of split 3; it is used
when ``5imgs_class.txt`` is absent. The published 1% list exists for split 1 only.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

from moca_eval.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SHOW = 5  # how many offending names an error message lists


@dataclass(frozen=True)
class Setting:
    """A low-shot setting: ``shots`` images per class, or ``percent`` % of each class."""

    shots: int | None = None
    percent: float | None = None

    def __post_init__(self) -> None:
        if (self.shots is None) == (self.percent is None):
            raise ValueError("a setting has exactly one of shots or percent")
        if self.shots is not None and self.shots < 1:
            raise ConfigError(f"--shots {self.shots}: shots must be >= 1")
        if self.percent is not None and not 0 < self.percent <= 100:  # NaN fails too
            raise ConfigError(f"--percent {self.percent:g}: percents must be in (0, 100]")

    @property
    def sort_key(self) -> tuple[int, float]:
        """Shot settings first (by shots), then percent settings."""
        return (0, self.shots) if self.shots is not None else (1, self.percent)

    def __lt__(self, other: Setting) -> bool:
        return self.sort_key < other.sort_key

    @property
    def name(self) -> str:
        return f"{self.shots}-shot" if self.shots is not None else f"{self.percent:g}%"

    def filename(self, split: int) -> str:
        """Path of this setting's file for ``split`` (1-based) inside a split directory."""
        stem = f"{self.shots}imgs_class" if self.shots is not None else f"{self.percent:g}percent"
        return f"imagenet_subsets{split}/{stem}.txt"

    def per_class(self, n_images: int) -> int:
        """Images wanted from a class holding ``n_images`` (percent: rounded half up, >= 1)."""
        if self.shots is not None:
            return self.shots
        return max(1, int(n_images * self.percent / 100 + 0.5))

    def as_json(self) -> dict:
        if self.shots is not None:
            return {"shots": self.shots}
        return {"percent": int(self.percent) if float(self.percent).is_integer() else self.percent}


@dataclass(frozen=True)
class DatasetKeys:
    """The images of an ImageFolder split, as keys ``<class>/<file>`` relative to its root."""

    root: str
    classes: tuple[str, ...]
    keys: tuple[str, ...]

    @classmethod
    def from_index(cls, index) -> DatasetKeys:
        """From a ``moca_eval.data.ImageFolderIndex`` (``root``, ``classes``, ``samples``)."""
        keys = tuple(Path(rel).as_posix() for rel in index.relpaths())
        return cls(root=str(index.root), classes=tuple(index.classes), keys=keys)

    @cached_property
    def key_set(self) -> frozenset[str]:
        return frozenset(self.keys)

    @cached_property
    def by_class(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {c: [] for c in self.classes}
        for key in self.keys:
            out.setdefault(class_of(key), []).append(key)
        return out

    def digest(self) -> str:
        """sha256 of the sorted keys: identifies the dataset's file list."""
        return sha256_text("\n".join(sorted(self.keys)) + "\n")


@dataclass(frozen=True)
class SplitFile:
    """One split file: the images (keys, file order) selected for ``setting`` in ``split``."""

    setting: Setting
    split: int
    relpath: str
    keys: tuple[str, ...]
    sha256: str
    source: str = "generated"
    short: dict[str, int] = field(default_factory=dict)  # class -> images found (< wanted)

    @property
    def text(self) -> str:
        return format_split_text(self.keys)


def class_of(key: str) -> str:
    return key.split("/", 1)[0]


def line_to_key(line: str) -> str:
    """A split-file line (``n0_1.JPEG`` or ``cls/file``) as a key."""
    return line if "/" in line else f"{line.split('_', 1)[0]}/{line}"


def key_to_line(key: str) -> str:
    """The shortest line naming ``key``: the bare file name when ``<class>_`` starts it."""
    cls, _, rest = key.partition("/")
    if "/" not in rest and "_" not in cls and rest.startswith(cls + "_"):
        return rest
    return key


def format_split_text(keys: Iterable[str]) -> str:
    return "".join(key_to_line(k) + "\n" for k in keys)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def parse_split_text(text: str, *, source: str) -> tuple[str, ...]:
    """Keys named by a split file's text; empty files and duplicates are errors."""
    lines = [ln.strip() for ln in text.splitlines()]  # CRLF and trailing blanks go
    odd = next(((n, ln) for n, ln in enumerate(lines, 1) if not ln.isprintable()), None)
    if odd:
        char = next(c for c in odd[1] if not c.isprintable())
        raise DatasetError(f"{source}: line {odd[0]} holds the unprintable character U+{ord(char):04X} "
                           f"({odd[1]!r}); a split file lists one image name per line")
    keys = [line_to_key(ln) for ln in lines if ln]
    if not keys:
        raise DatasetError(f"{source}: split file is empty")
    dup = [k for k, c in Counter(keys).items() if c > 1]
    if dup:
        raise DatasetError(f"{source}: {len(dup)} image(s) listed twice, e.g. "
                           f"{', '.join(key_to_line(k) for k in dup[:SHOW])}")
    return tuple(keys)


def read_split_file(path: str | os.PathLike, setting: Setting, split: int, *,
                    relpath: str | None = None) -> SplitFile:
    """Read one split file (no dataset check: see :func:`check_split_file`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read split file ({e.strerror})") from e
    try:
        text = data.decode("utf-8-sig")  # a UTF-8 byte-order mark is dropped
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: split file is not UTF-8 text") from e
    keys = parse_split_text(text, source=str(path))
    return SplitFile(setting=setting, split=split, relpath=relpath or path.name, keys=keys,
                     sha256=hashlib.sha256(data).hexdigest(), source=str(path))


def check_split_file(sf: SplitFile, data: DatasetKeys, *, allow_short: bool = False,
                     warnings: list[str] | None = None) -> SplitFile:
    """Check ``sf`` against the dataset; returns it with ``short`` filled in.

    Every named image must exist. Each class must have the wanted number of images
    (``Setting.per_class``; for percent files at least one): fewer is an error unless
    ``allow_short``; more (shot files) is a warning appended to ``warnings``.
    """
    missing = [k for k in sf.keys if k not in data.key_set]
    if missing:
        raise DatasetError(
            f"{sf.source}: {len(missing)} of {len(sf.keys)} images are not in {data.root}: "
            f"{', '.join(key_to_line(k) for k in missing[:SHOW])}"
            f"{', ...' if len(missing) > SHOW else ''}")
    counts = Counter(class_of(k) for k in sf.keys)
    want = sf.setting.shots if sf.setting.shots is not None else 1
    short = {c: counts[c] for c in data.classes if counts[c] < want}
    over = [c for c in data.classes if sf.setting.shots is not None and counts[c] > want]
    if over and warnings is not None:
        warnings.append(f"{sf.source}: {len(over)} classes have more than {want} "
                        f"images, e.g. {', '.join(over[:SHOW])}")
    if short and not allow_short:
        raise DatasetError(
            f"{sf.source}: {len(short)} classes have fewer than {want} images for "
            f"{sf.setting.name}: " + ", ".join(f"{c} ({n})" for c, n in list(short.items())[:SHOW])
            + (", ..." if len(short) > SHOW else "") + " (--allow-short trains on what exists)")
    return SplitFile(sf.setting, sf.split, sf.relpath, sf.keys, sf.sha256, sf.source, short)


def nesting_warnings(files: Sequence[SplitFile]) -> list[str]:
    """Warnings for shot files of one split that are not nested (1 within 2 within 5 ...)."""
    out = []
    by_split: dict[int, list[SplitFile]] = {}
    for sf in files:
        if sf.setting.shots is not None:
            by_split.setdefault(sf.split, []).append(sf)
    for split, group in sorted(by_split.items()):
        group.sort(key=lambda s: s.setting.shots)
        for small, big in zip(group, group[1:]):
            outside = set(small.keys) - set(big.keys)
            if outside:
                out.append(f"split {split}: {len(outside)} images of {small.relpath} are not in "
                           f"{big.relpath} (files are not nested)")
    return out


def locate_split_file(split_dir: str | os.PathLike, setting: Setting, split: int) -> Path | None:
    """The file for (setting, split) in a published or generated split directory, if any."""
    root = Path(split_dir)
    path = root / setting.filename(split)
    if path.is_file():
        return path
    if setting.shots == 5:  # MSN names split 3's 5-image list 3imgs_class.txt
        alt = root / f"imagenet_subsets{split}" / "3imgs_class.txt"
        if alt.is_file() and not (root / f"imagenet_subsets{split}" / "5imgs_class.txt").exists():
            return alt
    return None


def select_keys(data: DatasetKeys, setting: Setting, split: int, *, seed: int) -> list[str]:
    """The generated selection: per class, the first images in a seeded hash order.

    The order of a class's images is ``sha256(f"{seed}:{split}:{key}")``, so a selection
    depends only on the seed, the split and the image names (not on numpy, the listing
    order or the other classes), and the settings of one split are nested by construction.
    """
    out: list[str] = []
    for c in data.classes:
        ranked = sorted(data.by_class.get(c, []),
                        key=lambda k: (sha256_text(f"{seed}:{split}:{k}"), k))
        out.extend(ranked[: setting.per_class(len(ranked))])
    return out


def make_split_files(data: DatasetKeys, settings: Sequence[Setting], n_splits: int, *,
                     seed: int, allow_short: bool = False) -> list[SplitFile]:
    """Generate every (setting, split) file in memory; short classes need ``allow_short``."""
    files = []
    for setting in sorted(settings):
        for split in range(1, n_splits + 1):
            keys = tuple(select_keys(data, setting, split, seed=seed))
            sf = SplitFile(setting, split, setting.filename(split), keys,
                           sha256_text(format_split_text(keys)),
                           source=f"{data.root} (generating {setting.filename(split)})")
            files.append(check_split_file(sf, data, allow_short=allow_short))
    if not files:
        raise DatasetError("no split settings requested")
    log.debug("made %d split files from %d classes (%s)", len(files), len(data.classes),
              data.root)
    return files
