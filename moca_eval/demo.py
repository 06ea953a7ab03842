"""A procedural demo dataset: 10 shape/texture classes a good feature extractor separates.

Deterministic from a seed: the same seed gives byte-identical files. Colours, positions,
sizes and noise are random within every class, so colour alone does not give the label.
Layout is ImageNet's: ``OUT/{train,val}/nXXXXXXXX/nXXXXXXXX_YYYY.JPEG``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from moca_eval.models import ArchSpec, build_vit, sincos_pos_embed

CLASS_NAMES = (
    "circle", "square", "triangle", "cross", "ring",
    "h-stripes", "v-stripes", "checkerboard", "diagonal", "dots",
)
Draw = Callable[[ImageDraw.ImageDraw, np.random.Generator, int, tuple[int, int, int]], None]


def wnid(label: int) -> str:
    """ImageNet-style class folder name for a demo label."""
    return f"n{label + 1:08d}"


def _box(rng: np.random.Generator, size: int) -> tuple[int, int, int, int]:
    side = int(rng.integers(size * 4 // 10, size * 8 // 10))
    x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
    return x0, y0, x0 + side, y0 + side


def _circle(d, rng, size, fg):
    d.ellipse(_box(rng, size), fill=fg)


def _square(d, rng, size, fg):
    d.rectangle(_box(rng, size), fill=fg)


def _triangle(d, rng, size, fg):
    x0, y0, x1, y1 = _box(rng, size)
    d.polygon([((x0 + x1) // 2, y0), (x0, y1), (x1, y1)], fill=fg)


def _cross(d, rng, size, fg):
    x0, y0, x1, y1 = _box(rng, size)
    w = max(2, (x1 - x0) // 4)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    d.rectangle((x0, cy - w // 2, x1, cy + w // 2), fill=fg)
    d.rectangle((cx - w // 2, y0, cx + w // 2, y1), fill=fg)


def _ring(d, rng, size, fg):
    box = _box(rng, size)
    d.ellipse(box, outline=fg, width=max(2, (box[2] - box[0]) // 7))


def _stripes(d, rng, size, fg, *, vertical=False):
    period = int(rng.integers(6, 12))
    offset = int(rng.integers(0, period))
    for p in range(-period + offset, size, period):
        box = (p, 0, p + period // 2, size) if vertical else (0, p, size, p + period // 2)
        d.rectangle(box, fill=fg)


def _checker(d, rng, size, fg):
    cell = int(rng.integers(6, 12))
    for i in range(0, size, cell):
        for j in range(0, size, cell):
            if (i // cell + j // cell) % 2 == 0:
                d.rectangle((i, j, i + cell - 1, j + cell - 1), fill=fg)


def _diagonal(d, rng, size, fg):
    period = int(rng.integers(8, 14))
    for p in range(-size, 2 * size, period):
        d.line((p, 0, p + size, size), fill=fg, width=max(2, period // 3))


def _dots(d, rng, size, fg):
    step = int(rng.integers(8, 13))
    r = max(1, step // 4)
    for i in range(step // 2, size, step):
        for j in range(step // 2, size, step):
            d.ellipse((i - r, j - r, i + r, j + r), fill=fg)


DRAWERS: tuple[Draw, ...] = (
    _circle, _square, _triangle, _cross, _ring,
    _stripes, lambda d, rng, s, fg: _stripes(d, rng, s, fg, vertical=True),
    _checker, _diagonal, _dots,
)


def render(label: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One image of class ``label``: random colours, placement and pixel noise."""
    bg = rng.integers(0, 256, 3)
    fg = (bg + rng.integers(80, 176, 3)) % 256  # always far from the background
    img = Image.new("RGB", (size, size), tuple(int(v) for v in bg))
    DRAWERS[label](ImageDraw.Draw(img), rng, size, tuple(int(v) for v in fg))
    pixels = np.asarray(img, dtype=np.int16) + rng.integers(-20, 21, (size, size, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def make_demo_data(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_classes: int = 10,
    train_per_class: int = 40,
    val_per_class: int = 10,
    image_size: int = 64,
) -> Path:
    """Write the demo dataset to ``out_dir`` and return it (also writes ``classes.txt``)."""
    if not 1 <= num_classes <= len(CLASS_NAMES):
        raise ValueError(f"num_classes must be in 1..{len(CLASS_NAMES)}")
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(num_classes):
            folder = out / split / wnid(label)
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                render(label, rng, image_size).save(folder / f"{wnid(label)}_{i:04d}.JPEG", quality=95)
    lines = [f"{wnid(i)}\t{CLASS_NAMES[i]}\n" for i in range(num_classes)]
    (out / "classes.txt").write_text("".join(lines))
    return out


def save_random_moca_checkpoint(path: str | Path, *, arch: ArchSpec, seed: int = 0) -> Path:
    """A randomly initialised ViT saved in MOCA's full training-checkpoint layout.

    Teacher and student get different random weights (so picking the wrong one shows);
    ``args`` is an ``argparse.Namespace`` as in MOCA's ``save_model``.
    """
    torch.manual_seed(seed)
    teacher, student = build_vit(arch), build_vit(arch)
    fixed = sincos_pos_embed(arch.embed_dim, arch.grid_size)
    model = {}
    for prefix, net in (("encoder_teacher.", teacher), ("encoder.", student)):
        net.pos_embed.data.copy_(fixed)
        model.update({prefix + k: v for k, v in net.state_dict().items()})
    ckpt = {"model": model, "epoch": 0, "scaler": {},
            "args": argparse.Namespace(model="moca_vit_random", input_size=arch.img_size)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path
