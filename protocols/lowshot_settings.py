"""Low-shot solver names and stopping defaults: plain values, importable without numpy or torch
(the command line's ``--help`` reads them)."""

from __future__ import annotations

from typing import Literal

CYANURE_SOLVERS: tuple[str, ...] = (
    "auto", "catalyst-miso", "qning-miso", "miso", "svrg", "catalyst-svrg", "qning-svrg",
    "acc-svrg", "ista", "fista", "catalyst-ista", "qning-ista",
)
SOLVERS: tuple[str, ...] = (*CYANURE_SOLVERS, "sklearn", "torch")
DType = Literal["float32", "float64"]


# cyanure settings chosen with bench/bench_lowshot.py (BENCHMARKS.md): 'auto' resolves to
# catalyst-miso at lambda 0.1 and to qning-miso at 2.5e-4; float32 is NOT safe (its duality
# gap is wrong, so it stops early: -23 points at lambda 0.1). With a GPU the torch solver
# (``lowshot_logreg.DEFAULT_SOLVER``).
DEFAULT_DTYPE: DType = "float64"
# every solver but sklearn: certified gap <= tol * min(F(W), F(0) - F(W)) (module docstring)
DEFAULT_TOL: float = 1e-3
DEFAULT_MAX_ITER: int = 300  # cyanure passes (MSN's); then the torch solver takes over
# L-BFGS makes tightening cheap (+30% passes from 1e-3 to 1e-6 on the tests' problems)
TORCH_TOL: float = 1e-6
TORCH_MAX_ITER: int = 2000
# The float64 L-BFGS reference: a gradient tolerance, so much tighter.
SKLEARN_TOL: float = 1e-8
SKLEARN_MAX_ITER: int = 5000
