"""mmengine's own checkpoints load with weights_only, and nothing more is allowed."""

from __future__ import annotations

import pickle

import pytest

pytest.importorskip("mmengine", reason="the [dense] extra is not installed")
import torch  # noqa: E402
from mmengine.logging.history_buffer import HistoryBuffer  # noqa: E402

from moca_eval.mm_utils import mmengine_checkpoints  # noqa: E402


def test_log_buffers_saved_inside_the_block_load_with_weights_only(tmp_path):
    buffer = HistoryBuffer()
    for value in (1.0, 2.0, 6.0):
        buffer.update(value)
    with mmengine_checkpoints():
        torch.save({"message_hub": {"train/loss": buffer}}, tmp_path / "ok.pth")
        loaded = torch.load(tmp_path / "ok.pth", weights_only=True)["message_hub"]["train/loss"]
    assert loaded.mean() == 3.0 and loaded.max() == 6.0 and loaded.current() == 6.0


def test_getattr_stays_forbidden_so_mmengines_default_pickles_are_refused(tmp_path):
    """mmengine pickles a buffer's statistics methods through ``getattr``, which could reach
    anything: such a file is refused, never loaded by widening the allow-list."""
    buffer = HistoryBuffer()
    buffer.update(1.0)
    torch.save({"buffer": buffer}, tmp_path / "mmengine-default.pth")  # outside the block
    with mmengine_checkpoints(), pytest.raises(pickle.UnpicklingError, match="getattr"):
        torch.load(tmp_path / "mmengine-default.pth", weights_only=True)
