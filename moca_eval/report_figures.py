"""The report's figures (the paper's Figure 1 style), one line or bar per checkpoint row:
low-shot top-1 vs labelled images per class, k-NN top-1 bars, k-NN top-1 vs pretraining time (rows
whose checkpoint also has a ``pretrain`` record), Cityscapes mIoU vs training images.
PNG or PDF (``fmt``); each titled with dataset, feature and recipe."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moca_eval.published import CITYSCAPES_SIZES, IMAGENET_1PCT, IMAGENET_CLASSES
from moca_eval.results import atomic_path

if TYPE_CHECKING:
    from moca_eval.reporting import Cell, Row, Table


def write_figures(table: Table, out: Path, *, fmt: str = "png") -> dict[str, Path]:
    """Every figure the table has data for: ``lowshot``, ``knn``, ``seg`` (``<name>.<fmt>``)."""
    written = {}
    for name, draw in (("lowshot", lowshot_figure), ("knn", knn_figure), ("knn_time", knn_time_figure),
                       ("seg", seg_figure)):
        path = out / f"{name}.{fmt}"
        if draw(table, path):
            written[path.name] = path
    return written


def _rows_with(table: Table, prefix: str) -> list[Row]:
    return [r for r in table.rows if any(c.startswith(prefix) for c in r.cells)]


SHOWN = ("feature", "recipe")  # settings named in titles (shared) or legends (per checkpoint)


def _values(cells: Sequence[Cell], key: str) -> set[str]:
    return {str(v) for v in (c.settings.get(key) for c in cells) if v is not None}


def _subtitle(cells: Sequence[Cell], records: dict[str, dict]) -> str:
    """``dataset, feature X, recipe Y`` over the measured cells; a setting that differs between
    checkpoints is named in the legend instead (``_legend``)."""
    data = "/".join(sorted({Path(records[c.source]["dataset"]["root"]).name for c in cells
                            if c.source in records}))
    shared = [f"{k} {v}" for k in SHOWN if len(vals := _values(cells, k)) == 1 for v in vals]
    varying = [k for k in SHOWN if len(_values(cells, k)) > 1]
    return ", ".join([p for p in (data, *shared) if p] + ([f"{' and '.join(varying)} per checkpoint"]
                                                           if varying else []))


def _legend(row: Row, table: Table, prefix: str) -> str:
    """The row's label, plus its own feature/recipe when they differ between the plotted rows."""
    varying = [k for k in SHOWN if len(_values(_measured(table, prefix), k)) > 1]
    if row.published or not varying:
        return row.label
    cells = [c for k, c in row.cells.items() if k.startswith(prefix)]
    own = ["/".join(sorted(_values(cells, k))) for k in varying]
    return f"{row.label} ({', '.join(v for v in own if v)})"


def _measured(table: Table, prefix: str) -> list[Cell]:
    return [c for r in table.rows if not r.published for k, c in r.cells.items() if k.startswith(prefix)]


def lowshot_figure(table: Table, path: Path) -> bool:
    """Top-1 (mean +- std band) vs labelled images per class; a percent setting sits at its mean
    images per class (1% of ImageNet: 12.8); published rows dashed."""
    rows = _rows_with(table, "low-shot ")
    if not any(not r.published for r in rows):
        return False
    records = {str(p): r for p, r in table.records}
    fig = _figure(7.6, 4.4)
    ax = fig.add_subplot()
    ticks: dict[float, str] = {}
    for i, row in enumerate(rows):
        points = sorted(_lowshot_points(row, records))
        xs, ys, errs = (list(v) for v in zip(*[(x, m, s) for x, m, s, _ in points]))
        style = (dict(ls="--", marker="s", ms=4, lw=1.2, alpha=0.7) if row.published
                 else dict(marker="o", lw=2))
        ax.plot(xs, ys, color=f"C{i}", label=_legend(row, table, "low-shot "), **style)
        if not row.published:
            ax.fill_between(xs, [y - e for y, e in zip(ys, errs)], [y + e for y, e in zip(ys, errs)],
                            color=f"C{i}", alpha=0.2)
        ticks.update({x: tag for x, _, _, tag in points})
    ax.set_xscale("log")
    ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
    ax.minorticks_off()
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("Low-shot logistic regression\n" + _subtitle(_measured(table, "low-shot "), records),
                 fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
    return True


def _lowshot_points(row: Row, records: dict[str, dict]) -> list[tuple[float, float, float, str]]:
    """``(images per class, mean, std, tick label)`` of a row's low-shot cells."""
    points = []
    for column, cell in row.cells.items():
        setting = column.removeprefix("low-shot ")
        if not column.startswith("low-shot ") or cell.mean is None:
            continue
        if setting.endswith("-shot"):
            x = float(setting.removesuffix("-shot"))
            points.append((x, cell.mean, cell.std or 0.0, f"{x:g}"))
            continue
        if row.published:
            x = IMAGENET_1PCT / IMAGENET_CLASSES
        else:
            record = records[cell.source]
            entry = next(s for s in record["metrics"]["splits"] if s["setting"] == setting)
            x = entry["n_train"] / max(1, record["dataset"]["n_classes"])
        points.append((x, cell.mean, cell.std or 0.0, f"{setting}\n({x:.3g})"))
    return points


def _figure(width: float = 6.4, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=150)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."))


def knn_figure(table: Table, path: Path) -> bool:
    """Horizontal k-NN top-1 bars, measured rows first, published rows hatched grey."""
    rows = [r for r in table.rows if "k-NN top-1" in r.cells and r.cells["k-NN top-1"].mean is not None]
    if not any(not r.published for r in rows):
        return False
    fig = _figure(6.4, 1.2 + 0.45 * len(rows))
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(len(rows))]
    for i, row in enumerate(rows):
        value = row.cells["k-NN top-1"].mean
        style = {"color": "0.8", "hatch": "//", "edgecolor": "0.4"} if row.published else {"color": colors[i]}
        ax.barh(i, value, **style)
        ax.text(value, i, f" {value:.1f}{row.cells['k-NN top-1'].flags}", va="center", fontsize=9)
    ax.set_yticks(range(len(rows)), [_legend(r, table, "k-NN") for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, max(r.cells["k-NN top-1"].mean for r in rows) * 1.18)
    ax.set_xlabel("k-NN top-1 (%)")
    records = {str(p): r for p, r in table.records}
    ax.set_title("k-NN top-1\n" + _subtitle(_measured(table, "k-NN"), records), fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)
    return True


def knn_time_figure(table: Table, path: Path) -> bool:
    """k-NN top-1 vs pretraining time (hours x processes, log axis), one labelled point per
    checkpoint that has both a k-NN and a pretraining record (the paper's Figure 1, left)."""
    from moca_eval.reporting import PRETRAIN_HOURS

    rows = [r for r in table.rows if not r.published and r.cells.get("k-NN top-1")
            and r.cells["k-NN top-1"].mean is not None and r.cells.get(PRETRAIN_HOURS)
            and r.cells[PRETRAIN_HOURS].mean]
    if not rows:
        return False
    fig = _figure(6.4, 4.2)
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        hours, top1 = row.cells[PRETRAIN_HOURS].mean, row.cells["k-NN top-1"].mean
        ax.plot(hours, top1, "o", color=f"C{i}", markersize=8, label=_legend(row, table, "k-NN"))
        ax.annotate(f"{top1:.1f}{row.cells['k-NN top-1'].flags}", (hours, top1), textcoords="offset points",
                    xytext=(6, 4), fontsize=9)
    from matplotlib.ticker import FuncFormatter

    ax.set_xscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=8)
    ax.margins(x=0.2, y=0.2)
    ax.set_xlabel("pretraining time (hours x processes)")
    ax.set_ylabel("k-NN top-1 (%)")
    records = {str(p): r for p, r in table.records}
    ax.set_title("k-NN top-1 vs pretraining time\n" + _subtitle(_measured(table, "k-NN"), records),
                 fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=9, frameon=True)
    _save(fig, path)
    return True


def seg_figure(table: Table, path: Path) -> bool:
    """Cityscapes mIoU vs training images: linear (solid) and fine-tuning (dashed) per row."""
    rows = _rows_with(table, "seg ")
    if not any(not r.published for r in rows):
        return False
    fig = _figure(7.6, 4.4)
    ax = fig.add_subplot()
    for i, row in enumerate(rows):
        for mode, style in (("linear", "-"), ("finetune", "--")):
            points = sorted((CITYSCAPES_SIZES[c.rsplit(" ", 1)[1]], cell.mean, cell.std or 0.0)
                            for c, cell in row.cells.items()
                            if c.startswith(f"seg {mode} ") and c.rsplit(" ", 1)[1] in CITYSCAPES_SIZES)
            if points:
                xs, ys, errs = zip(*points)
                ax.errorbar(xs, ys, yerr=errs, fmt=style, marker="o", color=f"C{i}", capsize=3,
                            alpha=0.5 if row.published else 1.0,
                            label=_legend(row, table, "seg ") if mode == "linear" else None)
    for mode, style in (("linear probe", "-"), ("fine-tuning", "--")):
        ax.plot([], [], style, color="0.3", label=mode)
    ax.set_xscale("log")
    ax.set_xticks(list(CITYSCAPES_SIZES.values()), [str(v) for v in CITYSCAPES_SIZES.values()])
    ax.minorticks_off()
    ax.set_xlabel("Cityscapes training images")
    ax.set_ylabel("mIoU (%)")
    records = {str(p): r for p, r in table.records}
    ax.set_title("Cityscapes segmentation\n" + _subtitle(_measured(table, "seg "), records), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.01, 0.5))
    _save(fig, path)
    return True
