"""Feature cache entries that are damaged on disk are treated as misses, never as errors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from moca_eval.feature_cache import FeatureCache

KEY = "ab" * 32


@pytest.fixture()
def cache(tmp_path: Path) -> FeatureCache:
    cache = FeatureCache(tmp_path / "cache")
    cache.save(KEY, np.arange(6, dtype=np.float32).reshape(3, 2), np.array([True, False, True]))
    return cache


def test_saved_entry_loads_back_exactly(cache: FeatureCache) -> None:
    features, present = cache.load(KEY, 3)
    np.testing.assert_array_equal(features, [[0, 1], [2, 3], [4, 5]])
    assert present.dtype == bool and present.tolist() == [True, False, True]
    assert sorted(p.name for p in cache.root.iterdir()) == [f"{KEY}.json", f"{KEY}.npz"]  # no temp files


@pytest.mark.parametrize("meta", ["not json", "[]", "null", '"text"', "{}", '{"sha256": 5}'])
def test_damaged_metadata_is_a_miss_with_a_warning(cache: FeatureCache, meta: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    (cache.root / f"{KEY}.json").write_text(meta)
    with caplog.at_level(logging.WARNING, logger="moca_eval.feature_cache"):
        assert cache.load(KEY, 3) is None
    assert "is corrupt or stale" in caplog.text and f"{KEY}.npz" in caplog.text


def test_changed_npz_or_row_count_is_a_miss(cache: FeatureCache) -> None:
    assert cache.load(KEY, 4) is None  # the dataset has another size now
    (cache.root / f"{KEY}.npz").write_bytes(b"garbage")
    assert cache.load(KEY, 3) is None
    assert cache.load("cd" * 32, 3) is None  # never written
