"""Resumable extraction: the features of a split in progress, written shard by shard.

While the backbone runs, every ``shard_images`` images of this process's rows become
``<cache>/partial/<job>/shard-NNNNN.npz`` plus a ``.json`` holding its sha256 and the row
positions it covers (written last, so a shard without a valid json does not exist). ``<job>``
hashes the cache keys of the features being computed (checkpoint, dataset manifest, transform,
precision, names) and the process's rank: a rerun of the same job continues after its last
complete shard, any other job starts afresh. When the split is done the shards are merged into
ordinary cache entries and the directory is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moca_eval.checkpoint_io import sha256_file
from moca_eval.feature_cache import read_arrays, write_npz
from moca_eval.results import atomic_path, remove_stale_temps

log = logging.getLogger(__name__)


@dataclass
class Shard:
    """Features of positions ``[start, stop)`` of a process's rows; ``rows``: the decoded ones."""

    start: int
    stop: int
    rows: np.ndarray
    features: dict[str, np.ndarray]


class ShardStore:
    """The shard directory of one extraction job on one process."""

    def __init__(self, cache_root: Path, keys: Mapping[str, str], *, rank: int, world_size: int) -> None:
        job = json.dumps({"keys": dict(sorted(keys.items())), "rank": rank, "world": world_size})
        self.dir = Path(cache_root) / "partial" / hashlib.sha256(job.encode()).hexdigest()[:32]
        self.names = sorted(keys)

    def _paths(self, number: int) -> tuple[Path, Path]:
        return self.dir / f"shard-{number:05d}.npz", self.dir / f"shard-{number:05d}.json"

    def load(self) -> list[Shard]:
        """The complete shards, in order; the first damaged one and all after it are deleted."""
        remove_stale_temps(self.dir)  # left by a process killed while writing
        shards: list[Shard] = []
        while (shard := self._read(len(shards), shards[-1].stop if shards else 0)) is not None:
            shards.append(shard)
        for path in sorted(self.dir.glob("shard-*")):
            if int(path.stem.removeprefix("shard-")) >= len(shards):
                path.unlink(missing_ok=True)
        if shards:
            log.info("resuming feature extraction after %d complete shard(s) (%d images) in %s",
                     len(shards), shards[-1].stop, self.dir)
        return shards

    def _read(self, number: int, start: int) -> Shard | None:
        data_path, meta_path = self._paths(number)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            if meta["sha256"] != sha256_file(data_path) or meta["start"] != start:
                raise ValueError("checksum or position mismatch")
            rows, *feats = read_arrays(data_path, "rows", *self.names)
            if any(len(f) != len(rows) or f.dtype != np.float32 for f in feats):
                raise ValueError("row counts differ")
        except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            log.warning("partial feature shard %s is damaged (%s); recomputing from there", data_path, err)
            return None
        return Shard(start, int(meta["stop"]), rows, dict(zip(self.names, feats)))

    def save(self, number: int, shard: Shard) -> bool:
        """Write one shard (npz, then the json that validates it); False if the disk refused."""
        data_path, meta_path = self._paths(number)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            write_npz(data_path, rows=shard.rows, **shard.features)
            meta = {"sha256": sha256_file(data_path), "start": shard.start, "stop": shard.stop}
            with atomic_path(meta_path) as tmp:
                tmp.write_text(json.dumps(meta))
        except OSError as err:
            log.warning("cannot write partial feature shard %s (%s); an interrupted run will "
                        "restart this split", data_path, err.strerror or err)
            return False
        return True

    def remove(self) -> None:
        """Delete this job's shards (and ``partial/`` when no other job is in progress)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            self.dir.parent.rmdir()


def merge(shards: Sequence[Shard], names: Sequence[str]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``(rows, features per name)`` of consecutive shards."""
    rows = np.concatenate([s.rows for s in shards]) if shards else np.empty(0, dtype=np.int64)
    return rows, {n: np.concatenate([s.features[n] for s in shards]) for n in names if shards}
