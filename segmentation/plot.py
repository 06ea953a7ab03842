"""Per-class IoU bar chart of a segmentation result (mean over splits, +-std error bars)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moca_eval.results import atomic_path


def plot_per_class_iou(record: dict, out: Path) -> Path:
    """Write a PNG bar chart of the per-class IoU of a seg record (``SegResult.to_dict()``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    per_class_mean = record["metrics"]["values"]["per_class_iou_mean"]
    rows, miou = record["metrics"]["rows"], record["metrics"]["headline"]["value"]
    names = list(per_class_mean)
    per_split = np.array([[s["per_class_iou"][n] for n in names] for s in rows], dtype=float)
    means = np.array([per_class_mean[n] for n in names], dtype=float)
    stds = np.zeros_like(means)
    if len(per_split) > 1:
        with np.errstate(invalid="ignore"):
            stds = np.nan_to_num(np.nanstd(per_split, axis=0))
    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    x = np.arange(len(names))
    ax.bar(x, np.nan_to_num(means), yerr=stds if len(per_split) > 1 else None, capsize=3, color="#4c72b0")
    for i, value in enumerate(means):
        if math.isnan(value):
            ax.text(i, 1, "n/a", ha="center", fontsize=7, rotation=90)
    ax.axhline(miou, color="#c44e52", lw=1, ls="--", label=f"mIoU {miou:.1f}")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    splits, config = len(rows), record["config"]
    size = "full train set" if config["train_size"] == "full" else f"{config['train_size']} images"
    ax.set_title(f"Cityscapes {config['mode']} ({size}"
                 f"{f', mean +- std over {splits} splits' if splits > 1 else ''})")
    ax.legend(loc="upper right")
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
