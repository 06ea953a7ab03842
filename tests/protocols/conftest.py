"""Fixtures shared by the protocol tests."""

from __future__ import annotations

import pytest
import torch

from moca_eval.protocols import training


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads on a shared machine (module scope: fixtures too)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def run_interrupted(monkeypatch):
    """``run_interrupted(run, cfg, epoch)``: run ``run(cfg)`` and kill it right after the
    checkpoint of ``epoch`` is saved, as a crash would."""

    def go(run, cfg, epoch: int) -> None:
        save = training.save_checkpoint

        def save_then_die(path, state):
            save(path, state)
            if state["epoch"] == epoch:
                raise KeyboardInterrupt

        monkeypatch.setattr(training, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
        monkeypatch.undo()

    return go
