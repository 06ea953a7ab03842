"""Start-up time of ``moca-eval --help`` (target: under 1 s), against a bare ``python -c pass``
reference run in the same process (so the ratio is the CLI's own import cost).

    python bench/bench_help.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time


def best_of(cmd: list[str], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        tic = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        times.append(time.perf_counter() - tic)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per command; the best is kept")
    args = parser.parse_args()
    bare = best_of([sys.executable, "-c", "pass"], args.repeat)
    help_ = best_of([sys.executable, "-m", "moca_eval", "--help"], args.repeat)
    print(f"python -c pass: {bare:.3f} s; moca-eval --help: {help_:.3f} s ({help_ / bare:.1f}x); "
          f"target < 1 s: {'met' if help_ < 1 else 'NOT met'}")


if __name__ == "__main__":
    main()
