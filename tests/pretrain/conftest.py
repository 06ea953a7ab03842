"""Shared helpers for the pretraining tests: a micro MOCA config and tiny image folders."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moca_eval.pretrain.config import PretrainConfig, preset


def micro_config(**overrides: object) -> PretrainConfig:
    """A 2-block ViT-Tiny-width MOCA on 32-px images with 8-px patches: a step in ~0.1 s."""
    base = dict(
        depth=2, img_size=32, patch_size=8, border=1, num_words=32, num_new_words=4,
        decoder_dim=32, decoder_heads=2, decoder_depth=1, decoder_layer=1,
        epochs=2, warmup_epochs=1, batch_size=8, lr=1e-3, num_workers=0, progress=False,
    )
    return preset("tiny", **{**base, **overrides})


def write_images(folder: Path, count: int, *, size: int = 40, seed: int = 0) -> Path:
    """``count`` random RGB PNGs in ``folder`` (flat)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return folder


@pytest.fixture(scope="session")
def micro_cfg() -> Callable[..., PretrainConfig]:
    """Factory: ``micro_cfg(**overrides)`` -> the micro config with overrides."""
    return micro_config


@pytest.fixture(scope="session")
def make_images() -> Callable[..., Path]:
    """Factory: ``make_images(folder, count, size=40, seed=0)`` writes random PNGs."""
    return write_images


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    return write_images(tmp_path / "images", 16)
