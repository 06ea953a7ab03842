"""Reading checkpoint files safely: ``torch.load(weights_only=True)`` with a small allow-list.

A checkpoint is untrusted input. Only tensors, containers, ``argparse.Namespace`` and numpy
scalars/arrays (the objects training scripts store next to the weights) can be unpickled;
any other global is refused with a one-line error instead of being executed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moca_eval.errors import CheckpointError


def _numpy_globals() -> list[Any]:
    core = getattr(np, "_core", None) or np.core
    allowed: list[Any] = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [getattr(np.dtypes, name) for name in dir(np.dtypes) if name.endswith("DType")]
    return allowed


SAFE_GLOBALS: list[Any] = [argparse.Namespace, *_numpy_globals()]


def sha256_file(path: Path, *, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in chunks (remembered per path, size and times in this process)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns)
    if key not in _SHA256:
        _SHA256[key] = _sha256(path, chunk)
    return _SHA256[key]


_SHA256: dict[tuple[str, int, int, int], str] = {}


def _sha256(path: Path, chunk: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path: str | Path) -> Mapping[str, Any]:
    """Load a ``.pth``/``.pt``/``.ckpt`` or ``.safetensors`` file into a dict, safely.

    Raises:
        CheckpointError: missing or unreadable file, a pickle that would run code, or a
            file whose top level is not a dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory, expected a checkpoint file")
    try:  # safetensors reports an unreadable file as missing
        with open(path, "rb"):
            pass
    except OSError as err:
        raise CheckpointError(f"{path}: cannot open the checkpoint ({err.strerror or err})") from None
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            # junk bytes read as a pickle protocol number warn before failing: noise
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            warnings.filterwarnings("ignore", message="Validating sparse tensor")  # refused later
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(_unpickling_message(path, err)) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, KeyError, IndexError,
            struct.error) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        first = re.split(r"(?<=\.)\s", first, maxsplit=1)[0]  # torch appends advice sentences
        if isinstance(err, (KeyError, IndexError)):  # torch's legacy reader fed non-pickle bytes
            first = "neither a zip archive nor a complete pickle"
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint (truncated or corrupt?): {first}"
        ) from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a dict of tensors at the top level, found {type(obj).__name__}"
        )
    return obj


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file: {err}") from None


def _unpickling_message(path: Path, err: Exception) -> str:
    """One line for a file the safe unpickler refused, naming the global it would have imported."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))  # "Unsupported global: GLOBAL x.y was not..."
    refused = found.group(1) if found else next(
        (name for name in pickled_globals(path) if name not in _allowed_names()), None)
    if refused:
        return (
            f"{path}: refusing to unpickle {refused}: loading it would run code from the "
            "file (only tensors, containers, argparse.Namespace and numpy values are allowed)"
        )
    # torch's text: "... WeightsUnpickler error: \n\nUnsupported operand 80\n\nCheck the ..."
    _, _, detail = str(err).partition("WeightsUnpickler error:")
    line = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "") or "unsupported content"
    return (
        f"{path}: not a readable PyTorch checkpoint (corrupt, or not a checkpoint?): "
        f"the safe unpickler (weights_only=True) refused it: {line}"
    )


def _allowed_names() -> set[str]:
    from torch import _weights_only_unpickler

    torch_allowed = getattr(_weights_only_unpickler, "_get_allowed_globals", dict)()
    return {*torch_allowed, *(f"{g.__module__}.{g.__qualname__}" for g in SAFE_GLOBALS)}


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
               "BINSTRING", "SHORT_BINSTRING"}
_MEMO_PUTS = {"MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"}


def pickled_globals(path: Path) -> list[str]:
    """``module.name`` of every global the file's pickles import, read without unpickling.

    ``GLOBAL`` carries its name; ``STACK_GLOBAL`` (protocol 4+, which torch's safe unpickler
    cannot read at all) takes the two strings pushed before it, possibly through the memo.
    """
    stream = io.BytesIO(_pickle_bytes(path))
    names: list[str] = []
    strings: list[str] = []
    memo: dict[int, str] = {}
    last: str | None = None
    with contextlib.suppress(Exception):  # junk after the last pickle (legacy raw storages)
        while stream.tell() < len(stream.getbuffer()):
            for op, arg, _ in pickletools.genops(stream):
                pushed = None
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif op.name in _STRING_OPS:
                    pushed = str(arg)
                elif op.name in _MEMO_PUTS and last is not None:
                    memo[len(memo) if op.name == "MEMOIZE" else int(arg)] = last
                elif op.name in ("GET", "BINGET", "LONG_BINGET") and int(arg) in memo:
                    pushed = memo[int(arg)]
                if pushed is not None:
                    strings.append(pushed)
                    last = pushed
                elif op.name not in _MEMO_PUTS:
                    last = None
    return names


def _pickle_bytes(path: Path) -> bytes:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            member = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
            return archive.read(member) if member else b""
    return path.read_bytes()
