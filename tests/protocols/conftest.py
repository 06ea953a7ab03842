"""Fixtures shared by the protocol tests."""

from __future__ import annotations

import pytest

from moca_eval import runtime


@pytest.fixture(autouse=True, scope="module")
def _protocols_one_thread(one_thread):
    """Every protocol test module runs with one torch thread (module scope: fixtures too)."""


@pytest.fixture
def run_interrupted(monkeypatch):
    """``run_interrupted(run, cfg, epoch)``: run ``run(cfg)`` and kill it right after the
    checkpoint of ``epoch`` is saved, as a crash would."""

    def go(run, cfg, epoch: int) -> None:
        save = runtime.save_checkpoint

        def save_then_die(path, state):
            save(path, state)
            if state["epoch"] == epoch:
                raise KeyboardInterrupt

        monkeypatch.setattr(runtime, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run(cfg)
        monkeypatch.undo()

    return go
