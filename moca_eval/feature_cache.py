"""On-disk feature cache, keyed by everything that changes the numbers.

Key: checkpoint sha256 + how it was loaded (format, student, key, architecture) + dataset
manifest (paths, labels, sizes, mtimes and ctimes; or, with ``verify_data``, the sha256 of every
image) + the transform + the feature name + precision.
Each entry is ``<key>.npz`` plus ``<key>.json`` (written last, holding the npz's sha256):
an entry whose json is missing, unparsable or whose npz does not match is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moca_eval.checkpoint_io import sha256_file
from moca_eval.results import atomic_path, remove_stale_temps

if TYPE_CHECKING:
    from moca_eval.checkpoints import LoadedBackbone
    from moca_eval.data import ImageFolderIndex

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 2: bf16 on CPU runs a bf16 copy of the model; 3: image ctimes in the manifest


def cache_key(backbone: LoadedBackbone, index: ImageFolderIndex, transform: Any, name: str,
              precision: str, *, verify_data: bool = False) -> str:
    """sha256 over the canonical JSON of every input that affects the features.

    ``verify_data``: the dataset part hashes every image's bytes (``manifest_hash``).
    """
    parts = {
        "version": CACHE_VERSION,
        "checkpoint": backbone.sha256,
        "format": backbone.format,
        "student": backbone.student,
        "checkpoint_key": backbone.checkpoint_key,
        "arch": repr(backbone.arch),
        "dataset": index.manifest_hash(content=verify_data),
        "transform": repr(transform),
        "feature": name,
        "precision": precision,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


class FeatureCache:
    """A directory of cached feature arrays."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        return self.root / f"{key}.npz", self.root / f"{key}.json"

    def load(self, key: str, num_rows: int, *, dim: int | None = None
             ) -> tuple[np.ndarray, np.ndarray] | None:
        """``(features, present_mask)`` for ``key``, or None if absent, stale or corrupt.

        A hit must hold float32 features of ``num_rows`` rows (and ``dim`` columns when given)
        and a boolean mask of ``num_rows``; anything else is rebuilt.
        """
        data_path, meta_path = self._paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta["sha256"] != sha256_file(data_path):
                raise ValueError("checksum mismatch")
            features, present = read_arrays(data_path, "features", "present")
            check_entry(features, present, num_rows=num_rows, dim=dim)
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            # TypeError: json not a dict; BadZipFile/zlib.error: a damaged npz (bad CRC)
            log.warning("feature cache entry %s is corrupt or stale (%s); rebuilding", data_path, err)
            return None
        log.info("feature cache hit: %s", data_path.name)
        return features, present

    def save(self, key: str, features: np.ndarray, present: np.ndarray) -> bool:
        """Write an entry atomically (npz first, then the json that validates it).

        A failed write (full or read-only disk) is a warning: the features are already in
        memory and the run goes on. Returns whether the entry was written.
        """
        data_path, meta_path = self._paths(key)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            write_npz(data_path, features=features, present=present)
            meta = {"sha256": sha256_file(data_path), "rows": int(len(features)),
                    "dim": int(features.shape[1]) if features.ndim == 2 else None}
            with atomic_path(meta_path) as tmp:
                tmp.write_text(json.dumps(meta))
        except OSError as err:
            log.warning("cannot write the feature cache entry %s (%s); continuing without it",
                        data_path, err.strerror or err)
            return False
        return True

    def remove_stale_temp(self, keys: Iterable[str]) -> None:
        """Delete temp files a killed run left for ``keys`` (``.<key>.npz.*.tmp``)."""
        for key in keys:
            remove_stale_temps(self.root, key)


def read_arrays(path: Path, *names: str) -> tuple[np.ndarray, ...]:
    """Arrays ``names`` of an npz, read fully (a damaged member raises here, not later)."""
    with np.load(path, allow_pickle=False) as data:
        return tuple(np.asarray(data[n]) for n in names)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def check_entry(features: np.ndarray, present: np.ndarray, *, num_rows: int, dim: int | None) -> None:
    """ValueError unless ``features`` is float32 ``[num_rows, dim]`` and ``present`` bool ``[num_rows]``."""
    want = (num_rows, dim if dim is not None else (features.shape[1] if features.ndim == 2 else -1))
    if features.dtype != np.float32 or features.shape != want:
        raise ValueError(f"features {features.dtype} {features.shape}, expected float32 {want}")
    if present.dtype != np.bool_ or present.shape != (num_rows,):
        raise ValueError(f"mask {present.dtype} {present.shape}, expected bool ({num_rows},)")
