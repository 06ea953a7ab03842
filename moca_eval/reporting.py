"""Compare Records: one table (a row per checkpoint, a column per headline metric) and figures.

Reads only Records (``record.py``): result files, or directories searched for them. A cell whose
settings (feature, recipe, resolution, ``--limit``, dataset manifest) differ from the other rows'
in its column is flagged (``†``, with a note saying what differs); a record of a ``--limit``
smoke run is flagged non-comparable (``*``); ``--published`` adds the paper's rows.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moca_eval.errors import DatasetError
from moca_eval.results import atomic_path

log = logging.getLogger(__name__)
PRETRAIN_HOURS = "pretraining h"  # moca-eval pretrain records: training time x processes
COLUMN_ORDER = ("k-NN top-1", "low-shot 1-shot", "low-shot 2-shot", "low-shot 5-shot", "low-shot 1%",
                "linear top-1", "fine-tune top-1",
                "seg linear 100", "seg linear 372", "seg linear full",
                "seg finetune 100", "seg finetune 372", "seg finetune full", "COCO AP box", "COCO AP mask",
                PRETRAIN_HOURS)
SETTINGS = ("feature", "recipe", "resolution", "limit", "dataset")
DIFFERS, LIMITED = "†", "*"


@dataclass
class Cell:
    mean: float | None
    std: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # record file
    flags: str = ""

    def text(self, decimals: int, pm: str = " ± ") -> str:
        if self.mean is None:
            return "n/a" + self.flags
        std = f"{pm}{self.std:.{decimals}f}" if self.std is not None else ""
        return f"{self.mean:.{decimals}f}{std}{self.flags}"


@dataclass
class Row:
    label: str
    cells: dict[str, Cell] = field(default_factory=dict)
    published: bool = False


@dataclass
class Table:
    rows: list[Row]
    columns: list[str]
    notes: list[str]
    records: list[tuple[Path, dict]]


def find_records(paths: Iterable[str | Path]) -> list[tuple[Path, dict]]:
    """Every Record in ``paths`` (files, or directories searched recursively)."""
    out = []
    for path in map(Path, paths):
        if path.is_dir():
            files = sorted(path.rglob("*.json"))
        elif path.is_file():
            files = [path]
        else:
            raise DatasetError(f"{path}: no such record file or directory")
        for file in files:
            record = _read(file)
            if record is not None:
                out.append((file, record))
            elif not path.is_dir():
                raise DatasetError(f"{file}: not a moca-eval result record")
    if not out:
        raise DatasetError(f"no result records in {', '.join(map(str, paths))}")
    return out


def _read(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("schema_version", "protocol", "checkpoint", "metrics")
    return data if isinstance(data, dict) and all(k in data for k in keys) else None


def metric_cells(record: dict) -> dict[str, Cell]:
    """The report columns one record fills."""
    m, protocol = record["metrics"], record["protocol"]
    head = m["headline"]
    if protocol == "knn":
        return {"k-NN top-1": Cell(head["value"])}
    if protocol in ("linear", "finetune"):
        return {f"{'linear' if protocol == 'linear' else 'fine-tune'} top-1": Cell(head["value"])}
    if protocol == "lowshot":
        return {f"low-shot {s['setting']}": Cell(s["mean"], s["std"]) for s in m.get("splits") or []}
    if protocol == "seg":
        return {f"seg {s['setting']}": Cell(s["mean"], s["std"]) for s in m.get("splits") or []}
    if protocol == "det":
        values = m["values"]
        return {"COCO AP box": Cell(values.get("AP_box")), "COCO AP mask": Cell(values.get("AP_mask"))}
    if protocol == "pretrain" and m["values"].get("train_time_s") is not None:
        hours = m["values"]["train_time_s"] * m["values"].get("world_size", 1) / 3600
        return {PRETRAIN_HOURS: Cell(hours)}
    return {}


def settings_of(record: dict) -> dict[str, Any]:
    """The settings compared between rows (``SETTINGS``)."""
    cfg, data, ckpt = record.get("config", {}), record.get("dataset", {}), record["checkpoint"]
    spec = ckpt.get("arch_spec") or {}
    return {"feature": cfg.get("feature"), "recipe": (cfg.get("recipe") or {}).get("name"),
            "resolution": cfg.get("img_size", spec.get("img_size")),
            "limit": data.get("limit", cfg.get("limit")),
            "dataset": (data.get("manifest_sha256") or "")[:8] or None}


def label_of(record: dict, path: Path) -> str:
    ckpt = record["checkpoint"]
    if ckpt.get("label"):
        return ckpt["label"]
    if ckpt.get("source_kind") in ("hf-hub", "timm"):
        return ckpt["source"]
    return Path(ckpt["path"]).stem if ckpt.get("path") else path.stem


def build_table(records: Sequence[tuple[Path, dict]], *, published: bool = False) -> Table:
    """Rows per checkpoint (sha256), flags and notes (see the module docstring)."""
    rows: dict[tuple[str, int], Row] = {}
    labels: dict[str, str] = {}  # sha256 -> label
    for path, record in records:
        sha = record["checkpoint"].get("sha256", str(path))
        label = labels.setdefault(sha, _unique(label_of(record, path), sha, labels))
        limit = settings_of(record)["limit"]
        label += f" (limit {limit:g})" if limit is not None else ""  # a smoke run: its own row
        for column, cell in metric_cells(record).items():
            cell.settings, cell.source = settings_of(record), str(path)
            n = 0
            while column in rows.setdefault((label, n), Row(label if n == 0 else f"{label} [{n + 1}]")).cells:
                n += 1
            rows[(label, n)].cells[column] = cell
    out_rows = list(rows.values())
    notes = _flag(out_rows) + _schema_notes(records)
    if published:
        from moca_eval.published import PUBLISHED

        notes.append("(published): the MOCA paper's ViT-B/16 numbers (ImageNet-1k, Cityscapes, COCO)")
        out_rows += [Row(f"{name} (published)", {c: Cell(*v) for c, v in cols.items()}, published=True)
                     for name, cols in PUBLISHED.items()]
    present = {c for r in rows.values() for c in r.cells}
    columns = sorted(present, key=column_key)
    out_rows = [r for r in out_rows if not r.published or present & set(r.cells)]
    return Table(out_rows, columns, notes, list(records))


def column_key(column: str) -> tuple:
    """``COLUMN_ORDER``; low-shot settings by images per class (shots, then percents); other
    settings of a protocol after its known ones; unknown columns last."""
    if column.startswith("low-shot "):
        setting = column.removeprefix("low-shot ")
        number = setting.split("-")[0].rstrip("%").split(" ")[0]
        try:
            value = float(number)
        except ValueError:
            value = float("inf")
        return (COLUMN_ORDER.index("low-shot 1-shot"), "%" in setting, value, column)
    if column in COLUMN_ORDER:
        return (COLUMN_ORDER.index(column), False, 0.0, column)
    last = max((i for i, c in enumerate(COLUMN_ORDER) if c.split(" ")[0] == column.split(" ")[0]),
               default=len(COLUMN_ORDER))
    return (last + 0.5, False, 0.0, column)


def _unique(label: str, sha: str, labels: dict[str, str]) -> str:
    return f"{label}-{sha[:8]}" if label in labels.values() else label


def _flag(rows: list[Row]) -> list[str]:
    notes = []
    if any(c.settings.get("limit") is not None for r in rows for c in r.cells.values()):
        notes.append(f"{LIMITED} --limit smoke run: not comparable with full runs")
    columns = dict.fromkeys(c for r in rows for c in r.cells)
    for column in columns:
        cells = [(r.label, r.cells[column]) for r in rows if column in r.cells]
        for _, cell in cells:
            if cell.settings.get("limit") is not None:
                cell.flags += LIMITED
        differing = [k for k in SETTINGS if len({str(c.settings.get(k)) for _, c in cells}) > 1]
        if differing:
            for _, cell in cells:
                cell.flags = DIFFERS + cell.flags
            what = "; ".join(f"{k}: " + ", ".join(f"{label}={c.settings.get(k)}" for label, c in cells)
                             for k in differing)
            notes.append(f"{DIFFERS} {column}: settings differ ({what})")
    return notes


def _schema_notes(records: Sequence[tuple[Path, dict]]) -> list[str]:
    versions: dict[Any, list[str]] = {}
    for path, record in records:
        versions.setdefault(record.get("schema_version"), []).append(path.name)
    if len(versions) < 2:
        return []
    return ["records have different schema versions: " + "; ".join(
        f"v{v}: {len(names)} ({', '.join(names[:3])})" for v, names in sorted(versions.items(), key=str))]


# ----------------------------------------------------------------------------- writers
def to_markdown(table: Table, *, decimals: int = 1) -> str:
    head = ["checkpoint", *table.columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        cells = [row.cells[c].text(decimals) if c in row.cells else "" for c in table.columns]
        lines.append("| " + " | ".join([row.label, *cells]) + " |")
    return "\n".join(lines + [""] + [f"- {n}" for n in table.notes]) + "\n"


def to_csv(table: Table) -> str:
    """Full-precision values: ``<column>`` and ``<column> std``, plus the flags and the source."""
    with_std = [c for c in table.columns
                if any(c in r.cells and r.cells[c].std is not None for r in table.rows)]
    head = ["checkpoint", "published"]
    for c in table.columns:
        head += [c, f"{c} std"] if c in with_std else [c]
    head += ["flags"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    for row in table.rows:
        values: list[Any] = [row.label, int(row.published)]
        for c in table.columns:
            cell = row.cells.get(c)
            values.append("" if cell is None or cell.mean is None else cell.mean)
            if c in with_std:
                values.append("" if cell is None or cell.std is None else cell.std)
        values.append(" ".join(f"{c}:{row.cells[c].flags}" for c in table.columns
                               if c in row.cells and row.cells[c].flags))
        writer.writerow(values)
    return buf.getvalue()


def to_latex(table: Table, *, decimals: int = 1) -> str:
    """A booktabs ``tabular``; published rows below a ``\\midrule``."""
    def esc(text: str) -> str:
        return text.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%") \
            .replace("&", r"\&").replace("#", r"\#")

    def cell(row: Row, c: str) -> str:
        if c not in row.cells:
            return ""
        x = row.cells[c]
        flags = x.flags.replace(DIFFERS, r"\textsuperscript{\dag}").replace(LIMITED, r"\textsuperscript{*}")
        if x.mean is None:
            return "n/a" + flags
        std = rf" \pm {x.std:.{decimals}f}" if x.std is not None else ""
        return f"${x.mean:.{decimals}f}{std}$" + flags

    lines = [r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\toprule",
             " & ".join(["checkpoint", *map(esc, table.columns)]) + r" \\", r"\midrule"]
    measured = [r for r in table.rows if not r.published]
    published = [r for r in table.rows if r.published]
    for group in (measured, published):
        if group is published and published:
            lines.append(r"\midrule")
        lines += [" & ".join([esc(r.label), *(cell(r, c) for c in table.columns)]) + r" \\" for r in group]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}"]) + "\n"


def write_report(paths: Sequence[str | Path], out: str | Path, *, published: bool = False,
                 figure_format: str = "png", decimals: int = 1) -> dict[str, Path]:
    """Tables (``table.md``, ``table.csv``, ``table.tex``) and figures under ``out``."""
    from moca_eval.report_figures import write_figures

    table = build_table(find_records(paths), published=published)
    out = Path(out)
    written = {}
    for name, text in (("table.md", to_markdown(table, decimals=decimals)), ("table.csv", to_csv(table)),
                       ("table.tex", to_latex(table, decimals=decimals))):
        with atomic_path(out / name) as tmp:
            tmp.write_text(text)
        written[name] = out / name
    written.update(write_figures(table, out, fmt=figure_format))
    return written
