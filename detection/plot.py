"""A PNG of a few val images with the detector's predicted boxes and masks drawn."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image

from moca_eval.results import atomic_path

_COLOURS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128))


def plot_predictions(ann_file: Path, image_dir: Path, predictions: Path, out: Path, *, n_images: int = 4,
                     score_thr: float = 0.3, max_per_image: int = 30) -> Path:
    """Draw the first ``n_images`` val images (annotation-file order) with the predictions of
    ``predictions`` (a COCO results file with ``segmentation`` RLE, as mmdet's ``CocoMetric``
    writes it) scoring at least ``score_thr``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from pycocotools import mask as mask_utils

    gt = json.loads(Path(ann_file).read_text())
    names = {c["id"]: c["name"] for c in gt["categories"]}
    images = gt["images"][:n_images]
    preds = json.loads(Path(predictions).read_text()) if Path(predictions).is_file() else []
    cols = min(2, max(1, len(images)))
    rows = max(1, math.ceil(len(images) / cols))
    fig = Figure(figsize=(6 * cols, 4.5 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    for k, info in enumerate(images):
        ax = fig.add_subplot(rows, cols, k + 1)
        with Image.open(Path(image_dir) / info["file_name"]) as img:
            canvas = np.asarray(img.convert("RGB"), dtype=np.float32)
        mine = sorted((p for p in preds if p["image_id"] == info["id"] and p["score"] >= score_thr),
                      key=lambda p: -p["score"])[:max_per_image]
        boxes = []
        for j, p in enumerate(mine):
            colour = np.array(_COLOURS[j % len(_COLOURS)], dtype=np.float32)
            if "segmentation" in p:
                m = mask_utils.decode(p["segmentation"]).astype(bool)
                canvas[m] = 0.5 * canvas[m] + 0.5 * colour
            label = names.get(p["category_id"], p["category_id"])
            boxes.append((p["bbox"], colour / 255, f"{label} {p['score']:.2f}"))
        ax.imshow(canvas.astype(np.uint8))
        for (x, y, w, h), colour, text in boxes:
            ax.add_patch(Rectangle((x, y), w, h, fill=False, lw=1.5, edgecolor=colour))
            ax.text(x, y, text, fontsize=7, color="white", va="bottom",
                    bbox=dict(facecolor=colour, alpha=0.8, pad=1, lw=0))
        ax.set_title(f"{info['file_name']}: {len(mine)} prediction(s) >= {score_thr}", fontsize=9)
        ax.axis("off")
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return out
