"""Accuracy vs images per class for low-shot result files (mean line, +-std band per curve)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from moca_eval.errors import ConfigError, DatasetError
from moca_eval.results import atomic_path

FIGURE_FORMATS = ("png", "pdf", "svg")


def load_lowshot_json(path: str | Path) -> dict:
    """A ``moca-eval lowshot`` result record; anything else is a DatasetError."""
    path = Path(path)
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read result JSON ({e})") from e
    protocol = result.get("protocol") if isinstance(result, dict) else None
    if protocol != "lowshot" or not isinstance(result.get("metrics"), dict) \
            or not result["metrics"].get("splits"):
        raise DatasetError(f"{path}: not a low-shot result record (protocol {protocol!r})")
    return result


def figure_format(out: str | Path) -> str:
    """The file format an output path's extension asks for (png, pdf or svg); else ConfigError."""
    suffix = Path(out).suffix.lower().lstrip(".")
    if suffix not in FIGURE_FORMATS:
        raise ConfigError(f"{out}: a figure file must end in .{', .'.join(FIGURE_FORMATS)}")
    return suffix


def curves(result: dict) -> dict[str, tuple[list[tuple], list[tuple]]]:
    """Per lambda: (shot points, percent points), each sorted (images per class, mean, std,
    name); a percent setting's x is its mean number of training images per class."""
    n_classes = max(1, int(result.get("dataset", {}).get("n_classes", 1)))
    out: dict[str, tuple[list[tuple], list[tuple]]] = {}
    for row in result["metrics"]["splits"]:
        shots, pct = out.setdefault(str(row.get("lambd", "")), ([], []))
        if row.get("shots") is not None:
            shots.append((float(row["shots"]), row["mean"], row["std"], f"{row['shots']}-shot"))
        else:
            pct.append((row["n_train"] / n_classes, row["mean"], row["std"],
                        f"{row['percent']:g}%"))
    return {k: (sorted(a), sorted(b)) for k, (a, b) in out.items()}


def default_label(result: dict, path: str | Path) -> str:
    ckpt = result.get("checkpoint", {}).get("path")
    return Path(ckpt).stem if ckpt else Path(path).stem


def plot_lowshot(results: Sequence[dict], labels: Sequence[str], out: str | Path, *,
                 title: str = "Low-shot logistic regression") -> Path:
    """Write a figure (PNG, PDF or SVG by extension): one curve (+-std band) per result and lambda
    over the shot settings, percent settings as separate starred points; log x axis."""
    fmt = figure_format(out)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.2), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ticks: set[float] = set()
    for result, label in zip(results, labels):
        per_lambda = curves(result)
        for lambd, (shots, pct) in per_lambda.items():
            name = label if len(per_lambda) == 1 else f"{label} (lambda {lambd})"
            color = None
            if shots:
                xs, mean, std, _ = (list(v) for v in zip(*shots))
                (line,) = ax.plot(xs, mean, marker="o", label=name)
                color = line.get_color()
                ax.fill_between(xs, [m - s for m, s in zip(mean, std)],
                                [m + s for m, s in zip(mean, std)], color=color, alpha=0.2)
            for x, mean, std, tag in pct:  # percent settings: a separate marker each
                bar = ax.errorbar([x], [mean], yerr=[std], fmt="*", ms=10, color=color,
                                  label=None if shots else name)
                color = bar.lines[0].get_color()
                ax.annotate(tag, (x, mean), textcoords="offset points", xytext=(6, -10),
                            fontsize="small")
            ticks.update(p[0] for p in shots + pct)
    ax.set_xscale("log")
    if ticks:
        ax.set_xticks(sorted(ticks), [f"{t:g}" for t in sorted(ticks)])
        ax.minorticks_off()
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format=fmt)
    return out
