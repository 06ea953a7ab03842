"""On-disk feature cache, keyed by everything that changes the numbers.

Key: checkpoint sha256 + how it was loaded (format, student, key, architecture) + dataset
manifest (paths, labels, sizes, mtimes) + the transform + the feature name + precision.
Each entry is ``<key>.npz`` plus ``<key>.json`` (written last, holding the npz's sha256):
an entry whose json is missing, unparsable or whose npz does not match is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moca_eval.checkpoint_io import sha256_file
from moca_eval.results import atomic_path

if TYPE_CHECKING:
    from moca_eval.checkpoints import LoadedBackbone
    from moca_eval.data import ImageFolderIndex

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: bf16 on CPU runs a bf16 copy of the model instead of autocast


def cache_key(backbone: LoadedBackbone, index: ImageFolderIndex, transform: Any, name: str,
              precision: str) -> str:
    """sha256 over the canonical JSON of every input that affects the features."""
    parts = {
        "version": CACHE_VERSION,
        "checkpoint": backbone.sha256,
        "format": backbone.format,
        "student": backbone.student,
        "checkpoint_key": backbone.checkpoint_key,
        "arch": repr(backbone.arch),
        "dataset": index.manifest_hash(),
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

    def load(self, key: str, num_rows: int) -> tuple[np.ndarray, np.ndarray] | None:
        """``(features, present_mask)`` for ``key``, or None if absent, stale or corrupt."""
        data_path, meta_path = self._paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta["sha256"] != sha256_file(data_path):
                raise ValueError("checksum mismatch")
            with np.load(data_path) as data:
                features, present = data["features"], data["present"]
            if len(features) != num_rows or len(present) != num_rows:
                raise ValueError(f"{len(features)} rows, expected {num_rows}")
        except (OSError, ValueError, KeyError, TypeError) as err:  # TypeError: json not a dict
            log.warning("feature cache entry %s is corrupt or stale (%s); rebuilding", data_path, err)
            return None
        log.info("feature cache hit: %s", data_path.name)
        return features, present.astype(bool)

    def save(self, key: str, features: np.ndarray, present: np.ndarray) -> None:
        """Write an entry atomically (npz first, then the json that validates it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        data_path, meta_path = self._paths(key)
        with atomic_path(data_path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, features=features, present=present)
        meta = {"sha256": sha256_file(data_path), "rows": int(len(features)),
                "dim": int(features.shape[1]) if features.ndim == 2 else None}
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(meta))
