"""Shared test fixtures: a tiny random checkpoint, tiny demo data, the shared fixture folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from moca_eval.models import ArchSpec

# Width 32 with ONE head: the loader infers heads from the width (head dim 32 for
# non-standard widths), so a file written with this spec loads back as the same network.
TINY_ARCH = ArchSpec(embed_dim=32, depth=1, num_heads=1, patch_size=8, img_size=32)
SHARED_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(autouse=True)
def _feature_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """CLI runs that forget ``--cache-dir`` must never write to the user's ~/.cache."""
    monkeypatch.setenv("MOCA_EVAL_CACHE", str(tmp_path_factory.getbasetemp() / "default-cache"))


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module: tiny models gain nothing from threads on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_arch() -> ArchSpec:
    return TINY_ARCH


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random ViT (width 32, depth 1, patch 8, 32 px) in MOCA's full training layout. Read-only."""
    from moca_eval.demo import save_random_moca_checkpoint

    return save_random_moca_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-moca.pth", arch=TINY_ARCH)


@pytest.fixture(scope="session")
def tiny_demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo ImageFolder data: 10 classes, 6 train + 3 val images each, 32 px. Read-only."""
    from moca_eval.demo import make_demo_data

    return make_demo_data(tmp_path_factory.mktemp("demo") / "data", train_per_class=6, val_per_class=3,
                          image_size=32)


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """``../shared/fixtures`` (checkpoints written by the original projects), if present."""
    if not SHARED_FIXTURES.is_dir():
        pytest.skip(f"{SHARED_FIXTURES} not present (shared fixtures exist only in the dev checkout)")
    return SHARED_FIXTURES
