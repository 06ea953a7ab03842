"""Kill a moca-eval run with SIGKILL at random points and resume it (the issue-16 resume tests)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from moca_eval import outputs, runtime


def cli(argv: list[object], *, resume: bool) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "moca_eval", *map(str, argv), *(["--resume"] if resume else [])]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def log_lines(run: Path) -> int:
    path = run / runtime.LOG_NAME
    return path.read_text().count("\n") if path.exists() else 0


def kill_at_random_points(argv: list[object], run: Path, *, epochs: int, epoch_s: float, kills: int,
                          seed: int) -> list[int]:
    """Start and SIGKILL the run ``kills`` times, each at a random point, then plant a torn log line
    and a stale temp file and finish it; returns the log lines present at each kill.

    A kill lands while the run starts (once it has claimed its run directory; one time in four), or
    in training: once this process has rewritten the log, after a random number of further lines
    plus a random part of ``epoch_s`` (mid-epoch, mid-checkpoint write, mid-log append).
    """
    rng = random.Random(seed)
    landed = []
    log = run / runtime.LOG_NAME
    for attempt in range(kills):
        launched = time.time_ns()
        proc = cli(argv, resume=attempt > 0)
        early = rng.random() < 0.25
        extra, target = rng.randrange(0, max(1, epochs - 1)), None
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            if early and (run / outputs.MARKER).exists():
                time.sleep(rng.uniform(0.0, 2.0))
                break
            if target is None and log.exists() and log.stat().st_mtime_ns > launched:
                target = min(log_lines(run) + extra, epochs - 1)
            if target is not None and log_lines(run) >= target:
                time.sleep(rng.uniform(0.0, epoch_s))
                break
            time.sleep(0.005)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed.append(log_lines(run))
        proc.wait()
    if (run / runtime.LOG_NAME).exists():
        with open(run / runtime.LOG_NAME, "a") as handle:
            handle.write('{"epoch": 99, "lo')  # as a kill during an append leaves it
    (run / ".checkpoint.pth.abc123.tmp").write_bytes(b"\0" * 1024)
    final = cli(argv, resume=True)
    _, err = final.communicate(timeout=600)
    assert final.returncode == 0, err[-3000:]
    return landed
