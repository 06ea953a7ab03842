"""Suites: checkpoints x protocols x settings, one run directory and one Record per cell.

A cell runs in ``<output>/<checkpoint label>-<sha256[:8]>/<entry>-<settings hash[:8]>/``:
``record.json`` (the Record) and ``cell.json`` (status, error, and the fingerprint of
everything the numbers depend on, via ``runtime.write_finished``). Running a suite again reuses
every cell whose ``cell.json`` says done with the same fingerprint, resumes the training
protocols from their checkpoints, and retries failed cells. One failing cell is recorded with
its error and the others go on. Before a checkpoint's cells run, the features every
frozen-feature cell of it needs are extracted in one backbone pass per transform into the
feature cache, which the protocols then read.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from moca_eval.errors import ConfigError
from moca_eval.runtime import fingerprint, read_finished, write_finished
from moca_eval.sources import CheckpointSource

log = logging.getLogger(__name__)
CELL_FILE = "cell.json"
RECORD_FILE = "record.json"
# Config fields the suite fills in itself: never a setting.
RESERVED = ("job", "backbone", "overrides", "output_dir", "resume", "work_dir")


@dataclass(frozen=True)
class ProtocolSpec:
    """How the suite builds and runs one protocol (``module:Config`` + ``module.run``)."""

    name: str
    module: str
    config: str
    recipe: str | None = None  # recipe dataclass whose fields are accepted as overrides
    trains: bool = False  # has output_dir + resume (linear, finetune)
    dense: bool = False  # seg/det: own data argument, BackboneConfig instead of a FeatureJob
    needs: str | None = None  # module that must be importable (the dense extra)
    defaults: dict[str, Any] = field(default_factory=dict)

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    def setting_names(self) -> list[str]:
        """Every key a suite may set for this protocol."""
        names = [f.name for f in fields(self.config_class()) if f.name not in RESERVED]
        if self.recipe:
            recipe = getattr(importlib.import_module(self.module), self.recipe)
            names += [f.name for f in fields(recipe) if f.name not in ("name", "description")]
        return sorted(set(names))


PROTOCOLS: dict[str, ProtocolSpec] = {p.name: p for p in (
    ProtocolSpec("knn", "moca_eval.protocols.knn", "KnnConfig"),
    # the whole train set's features: cached once, shared with the other protocols
    ProtocolSpec("lowshot", "moca_eval.protocols.lowshot", "LowshotConfig",
                 defaults={"train_features": "all"}),
    ProtocolSpec("linear", "moca_eval.protocols.linear", "LinearConfig", recipe="LinearRecipe", trains=True),
    ProtocolSpec("finetune", "moca_eval.protocols.finetune", "FinetuneConfig", recipe="FinetuneRecipe",
                 trains=True),
    ProtocolSpec("seg", "moca_eval.segmentation.run", "SegConfig", dense=True, needs="mmseg"),
    ProtocolSpec("det", "moca_eval.detection.run", "DetConfig", dense=True, needs="mmdet"),
)}


@dataclass(frozen=True)
class Entry:
    """One protocol with settings (``name`` differs from ``protocol`` for named variants)."""

    name: str
    protocol: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CheckpointEntry:
    """A checkpoint of a suite and its load options (``BackboneConfig`` fields)."""

    source: CheckpointSource
    options: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.source.label


@dataclass(frozen=True)
class Suite:
    """What to run: checkpoints x entries on one dataset, under ``output``."""

    checkpoints: list[CheckpointEntry]
    entries: list[Entry]
    data: Any  # DataConfig
    extract: Any  # ExtractConfig
    output: Path
    name: str = "suite"


@dataclass(frozen=True)
class Cell:
    checkpoint: CheckpointEntry
    entry: Entry
    directory: Path
    key: str  # fingerprint

    @property
    def title(self) -> str:
        return f"{self.checkpoint.name} x {self.entry.name}"


@dataclass
class CellOutcome:
    cell: Cell
    status: str  # "done" | "reused" | "failed"
    error: str | None = None
    record: dict | None = None
    wall_time_s: float = 0.0


def cells(suite: Suite) -> list[Cell]:
    """Every (checkpoint, entry) cell, checkpoint-major (a checkpoint's features stay warm)."""
    from moca_eval.checkpoint_io import sha256_file

    out = []
    for ckpt in suite.checkpoints:
        sha = sha256_file(ckpt.source.path)
        for entry in suite.entries:
            settings = [entry.protocol, entry.settings, ckpt.options, _data_fields(suite.data),
                        suite.extract.resolved_precision()]
            directory = suite.output / f"{ckpt.name}-{sha[:8]}" / f"{entry.name}-{fingerprint(*settings)[:8]}"
            out.append(Cell(ckpt, entry, directory, fingerprint(sha, *settings)))
    return out


def _data_fields(data: Any) -> dict[str, Any]:
    return {f.name: getattr(data, f.name) for f in fields(data)}


def finished(cell: Cell) -> dict | None:
    """The record of a cell done earlier with the same fingerprint, else None."""
    state = read_finished(cell.directory / CELL_FILE, cell.key)
    record_path = cell.directory / RECORD_FILE
    if not state or state.get("status") != "done" or not record_path.is_file():
        return None
    import json

    return json.loads(record_path.read_text())


def build_config(spec: ProtocolSpec, settings: dict[str, Any], *, backbone: Any, data: Any,
                 extract: Any, run_dir: Path | None) -> Any:
    """The protocol's config dataclass for ``settings`` (recipe fields become ``overrides``)."""
    from moca_eval.pipeline import FeatureJob

    config_cls = spec.config_class()
    names = {f.name for f in fields(config_cls)}
    values = {k: _tupled(v) for k, v in {**spec.defaults, **settings}.items()}
    direct = {k: v for k, v in values.items() if k in names}
    overrides = {k: v for k, v in values.items() if k not in names}
    if overrides and not spec.recipe:
        raise ConfigError(f"{spec.name}: unknown setting(s) {', '.join(sorted(overrides))}")
    if spec.dense:
        direct.setdefault("work_dir", (run_dir or Path("runs")) / "work")
        if getattr(data, "limit", None) is not None:  # the suite's --limit: images of each split
            direct.setdefault("limit", data.limit)
        return config_cls(backbone=backbone, resume=run_dir is not None, **direct)
    if spec.recipe:
        direct["overrides"] = overrides
    if spec.trains and run_dir is not None:
        direct.update(output_dir=run_dir / "train", resume=True)
    return config_cls(job=FeatureJob(backbone, data, extract), **direct)


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list) else value


def run_protocol(spec: ProtocolSpec, cfg: Any, source: CheckpointSource) -> dict:
    """Run one protocol config; its Record as a dict, with the checkpoint's source added."""
    result = importlib.import_module(spec.module).run(cfg)
    record = result.record.to_dict()
    record["checkpoint"].update(source.record_fields())
    return record


def run_cell(suite: Suite, cell: Cell) -> CellOutcome:
    """Run (or resume) one cell; an exception becomes a failed outcome recorded in ``cell.json``."""
    from moca_eval.pipeline import BackboneConfig
    from moca_eval.results import write_json_atomic

    spec = PROTOCOLS[cell.entry.protocol]
    state = {"checkpoint": cell.checkpoint.source.spec, "entry": cell.entry.name,
             "protocol": spec.name, "settings": cell.entry.settings}
    write_finished(cell.directory / CELL_FILE, {**state, "status": "running"}, cell.key)
    start = time.time()
    try:
        backbone = BackboneConfig(cell.checkpoint.source.path, **cell.checkpoint.options)
        cfg = build_config(spec, cell.entry.settings, backbone=backbone, data=suite.data,
                           extract=suite.extract, run_dir=cell.directory)
        record = run_protocol(spec, cfg, cell.checkpoint.source)
        record["checkpoint"]["label"] = cell.checkpoint.name
    except Exception as err:  # noqa: BLE001 - one failing cell must not stop the suite
        log.warning("%s failed: %s: %s", cell.title, type(err).__name__, err)
        error = f"{type(err).__name__}: {' '.join(str(err).split())}"
        write_finished(cell.directory / CELL_FILE, {**state, "status": "failed", "error": error}, cell.key)
        return CellOutcome(cell, "failed", error, wall_time_s=time.time() - start)
    write_json_atomic(cell.directory / RECORD_FILE, record)
    wall = round(time.time() - start, 3)
    write_finished(cell.directory / CELL_FILE, {**state, "status": "done", "error": None,
                                                "record": RECORD_FILE, "wall_time_s": wall}, cell.key)
    return CellOutcome(cell, "done", record=record, wall_time_s=wall)


def run_suite(suite: Suite, *, progress: bool = True,
              on_cell: Callable[[CellOutcome], None] | None = None) -> list[CellOutcome]:
    """Run every missing cell of ``suite`` (see the module docstring); one outcome per cell."""
    from tqdm import tqdm

    todo = cells(suite)
    outcomes: list[CellOutcome] = []
    bar = tqdm(total=len(todo), desc=f"suite {suite.name}", unit="cell", disable=not progress)
    warmed: set[str] = set()
    for cell in todo:
        record = finished(cell)
        if record is not None:
            outcome = CellOutcome(cell, "reused", record=record)
        else:
            bar.set_postfix_str(_overview(outcomes, len(todo), running=cell.title))
            if cell.checkpoint.source.spec not in warmed:
                warmed.add(cell.checkpoint.source.spec)
                prewarm(suite, cell.checkpoint, [c.entry for c in todo if c.checkpoint == cell.checkpoint
                                                 and finished(c) is None])
            outcome = run_cell(suite, cell)
        outcomes.append(outcome)
        bar.update(1)
        bar.set_postfix_str(_overview(outcomes, len(todo)))
        if on_cell is not None:
            on_cell(outcome)
    bar.close()
    return outcomes


def _overview(outcomes: Sequence[CellOutcome], total: int, running: str | None = None) -> str:
    counts = {s: sum(o.status == s for o in outcomes) for s in ("done", "reused", "failed")}
    left = total - len(outcomes)
    text = f"done {counts['done']}, reused {counts['reused']}, failed {counts['failed']}, left {left}"
    return text + (f"; running {running}" if running else "")


def prewarm(suite: Suite, ckpt: CheckpointEntry, entries: Sequence[Entry]) -> None:
    """Extract, in one backbone pass per transform, every feature the frozen-feature entries
    will read, into the feature cache (nothing without a cache; errors are left to the cells)."""
    from moca_eval.pipeline import BackboneConfig, FeatureJob, extract_splits

    if suite.extract.cache_dir is None:
        return
    try:
        backbone = BackboneConfig(ckpt.source.path, **ckpt.options).load()
        needs: dict[str | None, list[str]] = {}
        for entry in entries:
            for interpolation, names in feature_needs(entry, backbone):
                needs.setdefault(suite.data.interpolation or interpolation, []).extend(names)
        splits = suite.data.splits()
        for interpolation, names in needs.items():
            job = FeatureJob(None, replace(suite.data, interpolation=interpolation), suite.extract)
            extract_splits(job, list(dict.fromkeys(names)), backbone, splits)
    except Exception as err:  # noqa: BLE001 - each cell reports its own error
        log.info("feature pre-extraction for %s skipped: %s", ckpt.name, err)


def feature_needs(entry: Entry, backbone: Any) -> list[tuple[str, list[str]]]:
    """``(default interpolation, feature names)`` a frozen-feature entry extracts on the full
    splits (the suite's ``interpolation``, when set, replaces the default)."""
    from moca_eval.families import FAMILIES, recipe_name

    s = {**PROTOCOLS[entry.protocol].defaults, **entry.settings}
    if entry.protocol == "knn":
        return [("bicubic", [s.get("feature") or FAMILIES.get(backbone.family).feature])]
    if entry.protocol == "lowshot" and s.get("train_features") == "all":
        from moca_eval.protocols.lowshot import LOWSHOT_RECIPES

        recipe = LOWSHOT_RECIPES.get(recipe_name("lowshot", backbone.family, s.get("recipe"))[0])
        return [(recipe.interpolation, [s.get("feature") or recipe.feature])]
    if entry.protocol == "linear" and s.get("mode") == "cached":
        from moca_eval.protocols.linear import LINEAR_RECIPES

        recipe = LINEAR_RECIPES.get(recipe_name("linear", backbone.family, s.get("recipe"))[0])
        return [("bicubic", list(s.get("features") or recipe.features))]
    return []
