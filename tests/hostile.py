"""Shared helpers of the hostile-input tests: run the CLI, read its one error line, snapshot files."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from moca_eval.checkpoint_io import read_checkpoint
from moca_eval.cli import main


def teacher(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    """The backbone state dict (timm names) of the tiny MOCA checkpoint (width 32, depth 1)."""
    model = read_checkpoint(tiny_checkpoint)["model"]
    prefix = "encoder_teacher."
    return {k.removeprefix(prefix): v.clone() for k, v in model.items() if k.startswith(prefix)}


def knn_args(ckpt: Path, data: Path, tmp: Path, *extra: str) -> list[str]:
    return ["knn", "--ckpt", str(ckpt), "--data", str(data), "--img-size", "32", "--k", "1",
            "--device", "cpu", "--num-workers", "0", "--batch-size", "8",
            "--cache-dir", str(tmp / "cache"), "--output", str(tmp / "out" / "knn.json"), *extra]


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (a file root counts as itself)."""
    files = [p for r in roots for p in ([r] if r.is_file() else sorted(r.rglob("*"))) if p.is_file()]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def fails_with_one_line(argv: list[str], capsys: pytest.CaptureFixture, *,
                        intact: Sequence[Path] = ()) -> str:
    """Run the CLI; it must exit 2 with exactly one ``moca-eval: error:`` line (besides progress
    bars) and leave every file under ``intact`` as it was. Returns the message."""
    before = snapshot(*intact)
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    assert snapshot(*intact) == before
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not _PROGRESS.match(ln)]  # tqdm bars
    assert len(lines) == 1, err
    assert lines[0].startswith("moca-eval: error: "), err
    return lines[0].removeprefix("moca-eval: error: ")


_PROGRESS = re.compile(r"^features \S+: +\d+%\|")
