"""Per-class IoU bar chart of a segmentation result (mean over splits, +-std error bars)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moca_eval.results import atomic_path


def plot_per_class_iou(result: dict, out: Path) -> Path:
    """Write a PNG bar chart of ``result['per_class_mean']`` (a ``SegResult.to_dict()``)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(result["per_class_mean"])
    per_split = np.array([[s["per_class_iou"][n] for n in names] for s in result["splits"]], dtype=float)
    means = np.array([result["per_class_mean"][n] for n in names], dtype=float)
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
    ax.axhline(result["miou_mean"], color="#c44e52", lw=1, ls="--", label=f"mIoU {result['miou_mean']:.1f}")
    ax.set_xticks(x, names, rotation=45, ha="right")
    ax.set_ylabel("IoU (%)")
    ax.set_ylim(0, 100)
    splits = len(result["splits"])
    size = "full train set" if result["train_size"] == "full" else f"{result['train_size']} images"
    ax.set_title(f"Cityscapes {result['mode']} ({size}"
                 f"{f', mean +- std over {splits} splits' if splits > 1 else ''})")
    ax.legend(loc="upper right")
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
