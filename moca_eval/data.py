"""ImageFolder datasets (``DIR/<split>/<class>/<image>``), eval transforms, safe image loading."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from moca_eval.checkpoint_io import sha256_file
from moca_eval.errors import DatasetError

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageFolderIndex:
    """The images of one split, in a fixed order (sorted classes, then sorted file names)."""

    root: Path
    classes: list[str]
    samples: list[tuple[Path, int]]
    _manifests: dict[bool, str] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def relpaths(self) -> list[str]:
        """Paths relative to the split root, as stable identifiers (``class/file``)."""
        return [str(path.relative_to(self.root)) for path, _ in self.samples]

    def manifest_hash(self, *, content: bool = False) -> str:
        """sha256 over every image's (relative path, label, size, mtime, ctime): the cache key.

        ``content``: over (relative path, label, sha256 of the bytes) instead, which finds any
        change of any image whatever its times say, at the cost of reading every file.
        """
        if content not in self._manifests:
            digest = hashlib.sha256()
            for (path, label), rel in zip(self.samples, self.relpaths()):
                digest.update(f"{rel}\t{label}\t{_identity(path, content=content)}\n".encode())
            self._manifests[content] = digest.hexdigest()
        return self._manifests[content]

    def subset(self, rows: Sequence[int]) -> ImageFolderIndex:
        """A new index holding only ``rows`` (in that order)."""
        return ImageFolderIndex(self.root, self.classes, [self.samples[i] for i in rows])


def _identity(path: Path, *, content: bool) -> str:
    """What the cache key knows of one image: its sha256, or its size and both times.

    ``st_ctime`` is set by the kernel on every write and cannot be set back, so a file whose
    content and mtime were replaced (``cp -p``, ``rsync -t``, ``tar x``) still changes it.
    """
    if content:
        return sha256_file(path)
    stat = path.stat()
    return f"{stat.st_size}\t{stat.st_mtime_ns}\t{stat.st_ctime_ns}"


def is_image(name: str) -> bool:
    return name.lower().endswith(IMG_EXTENSIONS)


def scan_image_folder(root: str | Path, *, classes: Sequence[str] | None = None) -> ImageFolderIndex:
    """Index ``root/<class>/<image>``.

    Args:
        root: the split directory.
        classes: the class list to label with (e.g. the train classes when scanning val);
            a class folder not in it is an error. Default: the sorted folder names.

    Raises:
        DatasetError: missing directory, no class folders, an empty class folder, or a
            class unknown to ``classes``.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such directory (expected <split>/<class>/<image> folders)")
    found = _names(root, lambda e: e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DatasetError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    class_list = list(classes) if classes is not None else found
    to_label = {name: i for i, name in enumerate(class_list)}
    unknown = [name for name in found if name not in to_label]
    if unknown:
        raise DatasetError(f"{root}: class folder(s) not in the training classes: {', '.join(unknown[:5])}")
    samples: list[tuple[Path, int]] = []
    for name in found:
        files = _names(root / name, lambda e: e.is_file() and is_image(e.name))
        if not files:
            raise DatasetError(f"{root / name}: empty class folder (no {'/'.join(IMG_EXTENSIONS)} files)")
        samples.extend((root / name / f, to_label[name]) for f in files)
    return ImageFolderIndex(root=root, classes=class_list, samples=samples)


def _names(folder: Path, keep: Callable[[os.DirEntry], bool]) -> list[str]:
    """Sorted names of the entries of ``folder`` that ``keep`` selects.

    Raises:
        DatasetError: the folder cannot be listed, or a selected name is not valid UTF-8.
    """
    try:
        names = sorted(e.name for e in os.scandir(folder) if keep(e))
    except OSError as err:
        raise DatasetError(f"{folder}: cannot read the folder ({err.strerror or err})") from None
    for name in names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes, kept by Python as lone surrogates
            raise DatasetError(f"{_printable(folder)}: the name {os.fsencode(name)!r} is not valid "
                               "UTF-8 (rename it, e.g. with convmv)") from None
    return names


def _printable(path: Path) -> str:
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def load_split(data_dir: str | Path, split: str, *, classes: Sequence[str] | None = None) -> ImageFolderIndex:
    """Index ``data_dir/split``, with a clear error when ``data_dir`` itself is wrong."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DatasetError(f"{data_dir}: no such dataset directory")
    if Path(split).is_absolute() or ".." in Path(split).parts:
        raise DatasetError(f"{data_dir}: split {split!r} leaves the dataset root (give the name of a "
                           f"folder inside {data_dir})")
    split_dir = data_dir / split
    if not split_dir.is_dir():
        have = sorted(p.name for p in data_dir.iterdir() if p.is_dir())
        raise DatasetError(
            f"{data_dir}: no {split!r} split folder (found: {', '.join(have) or 'nothing'}; "
            f"expected {data_dir}/{split}/<class>/<image>)"
        )
    return scan_image_folder(split_dir, classes=classes)


def eval_transform(
    crop: int = 224,
    *,
    resize: int | None = None,
    interpolation: str = "bicubic",
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize (shorter side, default crop/0.875: 256 for 224) + CenterCrop + normalise."""
    from torchvision import transforms as T

    mode = T.InterpolationMode(interpolation)
    return T.Compose([
        T.Resize(resize or round(crop / 0.875), interpolation=mode),
        T.CenterCrop(crop),
        T.ToTensor(),
        T.Normalize(mean, std),
    ])


def open_rgb(path: Path) -> Image.Image | None:
    """The image as RGB, or None when it cannot be decoded (corrupt or truncated)."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        log.debug("cannot decode %s: %s", path, err)
        return None


class ImageDataset(Dataset):
    """Yields ``(image_tensor_or_None, index)``; ``collate_skip_bad`` drops the Nones."""

    def __init__(self, index: ImageFolderIndex, transform: Callable[[Image.Image], torch.Tensor],
                 rows: Sequence[int] | None = None) -> None:
        self.index = index
        self.transform = transform
        self.rows = list(range(len(index))) if rows is None else list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int]:
        row = self.rows[i]
        img = open_rgb(self.index.samples[row][0])
        return (None if img is None else self.transform(img)), row


def collate_skip_bad(batch: list[tuple[torch.Tensor | None, int]]):
    """Stack the decodable images; return ``(images, rows, bad_rows)``."""
    good = [(img, row) for img, row in batch if img is not None]
    bad = [row for img, row in batch if img is None]
    images = torch.stack([img for img, _ in good]) if good else torch.empty(0)
    rows = torch.tensor([row for _, row in good], dtype=torch.long)
    return images, rows, bad
