"""The MOCA paper's published ViT-B/16 numbers (PROTOCOLS.md), as report columns.

Values: k-NN (paper Sec. C.3 / PROTOCOLS.md), low-shot mean +- std (paper Table 5l; stds only
where published), linear (Table 12 context), fine-tune, Cityscapes (Table 6), COCO (Sec. 4.4).
Column names are the report's (``reporting.COLUMN_ORDER``).
"""

from __future__ import annotations

Value = tuple[float, float | None]


def _lowshot(one: float, two: float, five: float, pct: float, stds: tuple = (None,) * 4) -> dict[str, Value]:
    names = ("low-shot 1-shot", "low-shot 2-shot", "low-shot 5-shot", "low-shot 1%")
    return {n: (v, s) for n, v, s in zip(names, (one, two, five, pct), stds)}


def _seg(linear: tuple, finetune: tuple) -> dict[str, Value]:
    sizes = ("100", "372", "full")
    return {**{f"seg linear {s}": (v, None) for s, v in zip(sizes, linear)},
            **{f"seg finetune {s}": (v, None) for s, v in zip(sizes, finetune)}}


PUBLISHED: dict[str, dict[str, Value]] = {
    "MOCA": {"k-NN top-1": (77.2, None), **_lowshot(55.4, 63.9, 69.9, 72.4, (0.4, 0.2, 0.1, None)),
             "linear top-1": (78.7, None), "fine-tune top-1": (83.6, None),
             **_seg((49.9, 55.2, 60.1), (51.5, 71.1, 78.2)),
             "COCO AP box": (50.5, None), "COCO AP mask": (43.6, None)},
    "DINO": {"k-NN top-1": (76.1, None), **_lowshot(41.8, 51.9, 61.4, 67.2), "linear top-1": (78.2, None),
             **_seg((45.8, 51.0, 55.5), (47.7, 65.7, 75.7)),
             "COCO AP box": (50.1, None), "COCO AP mask": (43.4, None)},
    "iBOT": {"k-NN top-1": (77.1, None), **_lowshot(46.1, 56.2, 64.7, 69.7), "linear top-1": (79.5, None),
             **_seg((47.8, 54.0, 59.3), (48.6, 66.8, 77.8)),
             "COCO AP box": (51.2, None), "COCO AP mask": (44.2, None)},
    "MAE": {**_lowshot(8.2, 25.0, 40.5, 51.1), "linear top-1": (68.0, None),
            **_seg((33.2, 39.6, 40.6), (41.4, 62.6, 77.7))},
    "MSN": _lowshot(49.8, 58.9, 65.5, 69.4),
}
# ImageNet-1k: the 1% split holds 12,811 images of 1,000 classes.
IMAGENET_CLASSES, IMAGENET_1PCT = 1000, 12811
CITYSCAPES_SIZES = {"100": 100, "372": 372, "full": 2975}
