"""One result record for every protocol (and pretraining): what ran, on what, and what came out.

Every record has the same top-level keys (``record.schema.json`` in this package is the contract):

- ``schema_version``, ``protocol`` (the command's name);
- ``checkpoint``: path, sha256, layout, family (and how it was chosen), architecture;
- ``dataset``: root, splits, manifest hash, class and image counts, skipped images;
- ``config``: the resolved settings, including ``recipe`` (name, version, why, values);
- ``metrics``: ``headline`` (one documented number per protocol, see ``HEADLINES``), ``values``
  (named scalars), ``rows`` (the protocol's detailed rows) and, where a protocol has splits,
  ``splits`` (per-setting values with mean and population std);
- ``provenance``: versions, commit, device, host, start/end times, wall time.

Two records of the same checkpoint and data differ only in ``protocol``, ``config``, ``metrics``
(and the times in ``provenance``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from moca_eval.results import provenance, utc_now, write_json_atomic

SCHEMA_VERSION = 1
SCHEMA_FILE = "record.schema.json"

# protocol -> what ``metrics.headline`` is (README "Result records").
HEADLINES = {
    "knn": "top-1 at k=20 and the first temperature (the paper's setting; else the first k)",
    "linear": "val top-1 of the selected head",
    "finetune": "val top-1 after the last epoch",
    "lowshot": "mean top-1 over splits of the first setting (1 image per class by default; smallest lambda)",
    "seg": "mIoU, mean over the training splits",
    "det": "COCO box AP",
    "pretrain": "mean training loss of the last epoch",
}


@dataclass
class Record:
    """A protocol's result; ``to_dict`` is what result files hold."""

    protocol: str
    checkpoint: dict[str, Any]
    dataset: dict[str, Any]
    config: dict[str, Any]
    metrics: dict[str, Any]
    provenance: dict[str, Any]
    schema_version: int = SCHEMA_VERSION

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        return json.loads(json.dumps({"schema_version": out.pop("schema_version"), **out},
                                     default=_jsonable))

    def write(self, path: str | Path) -> Path:
        """Write atomically (readers never see half a file)."""
        return write_json_atomic(path, self.to_dict())

    @property
    def headline(self) -> float | None:
        return self.metrics["headline"]["value"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return str(value)


@dataclass
class Clock:
    """Start time of a run (wall and UTC), for ``provenance``."""

    started: float = field(default_factory=time.time)
    started_utc: str = field(default_factory=utc_now)

    def provenance(self, **extra: Any) -> dict[str, Any]:
        return provenance(started_utc=self.started_utc, wall_time_s=round(time.time() - self.started, 3),
                          **extra)


def checkpoint_block(backbone: Any) -> dict[str, Any]:
    """The ``checkpoint`` block of a ``LoadedBackbone`` (plus, for a file in a hub cache, its hub
    ``source`` and ``revision``)."""
    from moca_eval.sources import hub_origin

    choice = backbone.family_choice
    return {
        "path": str(backbone.path),
        "sha256": backbone.sha256,
        "layout": backbone.format,
        "family": backbone.family,
        "family_source": choice.source if choice else "layout",
        "family_reason": choice.reason if choice else "",
        "student": backbone.student,
        "checkpoint_key": backbone.checkpoint_key,
        "arch": backbone.arch.describe(),
        "arch_spec": {k: getattr(backbone.arch, k) for k in backbone.arch.__dataclass_fields__},
        "pos_embed": backbone.pos_embed,
        "dropped_keys": len(backbone.dropped),
        **hub_origin(backbone.path),
    }


def dataset_block(root: str | Path, *, splits: dict[str, Any], n_classes: int,
                  skipped: Sequence[str] = (), **extra: Any) -> dict[str, Any]:
    """The ``dataset`` block. ``splits``: split name -> ``ImageFolderIndex`` (or an image count).

    ``manifest_sha256`` hashes the splits' manifests (relative path, label, size, mtime of every
    image), so two records on the same files carry the same value.
    """
    import hashlib

    counts, digest = {}, hashlib.sha256()
    for name, index in splits.items():
        counts[name] = index if isinstance(index, int) else len(index)
        digest.update(f"{name}:{index if isinstance(index, int) else index.manifest_hash()}\n".encode())
    return {"root": str(root), "splits": counts, "manifest_sha256": digest.hexdigest(),
            "n_classes": n_classes, "skipped_images": sorted(set(skipped)), **extra}


def recipe_block(name: str, values: Any, *, why: str, version: int | None = None) -> dict[str, Any]:
    """``config.recipe``: which recipe, why, its version and every value."""
    from moca_eval.families import RECIPES_VERSION

    values = asdict(values) if hasattr(values, "__dataclass_fields__") else dict(values or {})
    return {"name": name, "why": why, "version": version or RECIPES_VERSION, "values": values}


def metrics_block(headline_name: str, headline: float | None, *, values: dict[str, Any] | None = None,
                  rows: Sequence[dict[str, Any]] = (), splits: Sequence[dict[str, Any]] | None = None,
                  headline_std: float | None = None) -> dict[str, Any]:
    """The ``metrics`` block (see the module docstring)."""
    out: dict[str, Any] = {
        "headline": {"name": headline_name, "value": None if headline is None else float(headline),
                     "std": headline_std},
        "values": dict(values or {}),
        "rows": list(rows),
    }
    if splits is not None:
        out["splits"] = list(splits)
    return out


def split_summary(setting: str, values: Sequence[float], **extra: Any) -> dict[str, Any]:
    """One entry of ``metrics.splits``: the per-split values, their mean and population std."""
    arr = np.asarray(values, dtype=np.float64)
    return {"setting": setting, "values": [float(v) for v in arr], "n_splits": len(arr),
            "mean": round(float(arr.mean()), 4) if len(arr) else None,
            "std": round(float(arr.std()), 4) if len(arr) else None, **extra}


def schema() -> dict[str, Any]:
    """The JSON Schema of a record (shipped in the package)."""
    return json.loads(resources.files("moca_eval").joinpath(SCHEMA_FILE).read_text())


def validate_record(record: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``record`` fits the shipped schema (needs the
    ``jsonschema`` package, installed with the ``test`` extra)."""
    import jsonschema

    jsonschema.validate(record, schema())
