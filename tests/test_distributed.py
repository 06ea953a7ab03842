"""torchrun extraction with 2 CPU processes (gloo) equals one process: same rows, same order."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from moca_eval.demo import make_demo_data, save_random_moca_checkpoint
from moca_eval.models import ArchSpec


def _extract(args: list[str], out: Path, *, nproc: int) -> dict[str, np.ndarray]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*launcher, "-m", "moca_eval", "extract", *args, "--output", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as data:
        return {k: data[k] for k in data.files}


def test_torchrun_two_processes_match_one_process(tmp_path: Path) -> None:
    data = make_demo_data(tmp_path / "data", train_per_class=2, val_per_class=3, image_size=32)
    bad = data / "val" / "n00000002" / "n00000002_0001.JPEG"
    bad.write_bytes(b"not a jpeg")  # an undecodable image: absent on every rank, never misordered
    ckpt = save_random_moca_checkpoint(tmp_path / "c.pth", arch=ArchSpec(
        embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32))
    args = ["--ckpt", str(ckpt), "--data", str(data), "--split", "val", "--feature", "avg",
            "--img-size", "32", "--num-workers", "0", "--batch-size", "4", "--no-cache"]
    one = _extract(args, tmp_path / "one.npz", nproc=1)
    two = _extract(args, tmp_path / "two.npz", nproc=2)
    assert len(one["paths"]) == 29 and "n00000002/n00000002_0001.JPEG" not in set(one["paths"])
    assert list(two["paths"]) == list(one["paths"])
    assert np.array_equal(two["labels"], one["labels"])
    assert np.abs(two["features"] - one["features"]).max() < 1e-5
