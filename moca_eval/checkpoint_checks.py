"""Checks on an untrusted backbone state dict, made before anything is built from it.

- ``check_tensors``: string keys; dense floating-point tensors with a shape; storage that really
  holds every element (a stride-0 view of a few bytes can claim gigabytes once copied); finite
  values unless allowed.
- ``block_depth``: the depth is the number of ``blocks.N`` indices, which must run 0..N-1.
- ``shape_problems``: the key set and every shape against the architecture's, read from a model
  built on the meta device (no memory), so a mismatch is found before a real model exists.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from moca_eval.errors import CheckpointError

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _elements_stored(t: torch.Tensor) -> int:
    """Distinct storage elements a strided view reaches (its numel when nothing overlaps)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))


def _tensor_problem(key: str, value: object) -> str | None:
    if not isinstance(value, torch.Tensor):
        return f"{key} is a {type(value).__name__}, expected a tensor"
    if value.layout != torch.strided:
        return f"{key} is a {value.layout} tensor, expected a dense one (save tensor.to_dense())"
    if not value.is_floating_point():
        return f"{key} has dtype {value.dtype}, expected floating-point weights"
    if value.ndim == 0:
        return f"{key} is a 0-d scalar, expected a weight tensor with a shape"
    if value.numel() > _elements_stored(value):
        return (f"{key} claims shape {tuple(value.shape)} but stores only {_elements_stored(value)} "
                "element(s) (a stride-0 or overlapping view; save tensor.contiguous())")
    return None


def check_tensors(sd: Mapping[str, object], *, allow_nonfinite: bool = False) -> tuple[str, ...]:
    """Raise CheckpointError for the first malformed entry; return the keys holding NaN/inf.

    Non-finite values are an error unless ``allow_nonfinite`` (then the caller reports them).
    Keys were checked by the layout's converter (``checkpoint_formats.check_keys``).
    """
    for key, value in sd.items():
        problem = _tensor_problem(key, value)
        if problem:
            raise CheckpointError(problem)
    nonfinite = tuple(k for k, v in sd.items() if not bool(torch.isfinite(v).all()))
    if nonfinite and not allow_nonfinite:
        raise CheckpointError(
            f"{len(nonfinite)} tensor(s) hold NaN or inf values: {', '.join(nonfinite[:5])} "
            "(the features would be meaningless; --allow-nonfinite evaluates anyway)")
    return nonfinite


def block_depth(sd: Mapping[str, object]) -> int:
    """Number of transformer blocks: the ``blocks.N`` indices must be exactly 0..N-1."""
    indices = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    gap = next((pos for pos, i in enumerate(indices) if i != pos), None)
    if gap is not None:
        stray = next(k for k in sd if k.startswith(f"blocks.{indices[gap]}."))
        where = f"follows blocks.{gap - 1}" if gap else "but there is no blocks.0"
        raise CheckpointError(
            f"block indices have a gap: {stray} {where} (the depth is read from consecutive "
            "indices blocks.0, blocks.1, ...; a stray key?)")
    return len(indices)


def shape_problems(expected: Mapping[str, tuple[int, ...]], sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Missing, unexpected and mis-shaped keys of ``sd`` against ``expected`` shapes."""
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {shape}" for k, shape in expected.items()
             if k in sd and tuple(sd[k].shape) != tuple(shape)]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} backbone key(s): {', '.join(missing[:5])}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {', '.join(unexpected[:5])}")
    if wrong:
        problems.append(f"wrong shapes (file vs model): {', '.join(wrong[:3])}")
    return problems


def require_shape(sd: Mapping[str, torch.Tensor], key: str, ndim: int) -> tuple[int, ...]:
    """``sd[key].shape``, which must have ``ndim`` dimensions and no zero-size one."""
    shape = tuple(sd[key].shape)
    if len(shape) != ndim or 0 in shape:
        raise CheckpointError(f"{key} has shape {shape}, expected a non-empty {ndim}-d tensor")
    return shape
