"""How a run runs here: device, precision, process group, seeds, batch plan, checkpoints, logs.

The one runtime of moca-eval, used by the protocols, pretraining, segmentation and detection:

- ``Runtime`` / ``make_runtime``: join the ``torchrun`` group (gloo on CPU, NCCL on GPU), resolve
  device and precision (``resolve_device``, ``resolve_precision``: bf16 autocast on GPUs that
  have it, fp16 with a grad scaler on older ones, fp32 on CPU); ``Runtime.autocast``,
  ``Runtime.grad_scaler``, ``optimizer_step``; ``wrap_ddp``, ``unwrap``, ``sync_grads``,
  ``all_reduce_sum``.
- Seeds: ``derive_seed`` (well-mixed seeds from coordinates), ``seed_all``.
- ``BatchPlan`` / ``make_plan``: a global batch split over processes and accumulation steps; a
  global batch the processes cannot share evenly is an error, never silently shrunk.
- Checkpoints: ``save_checkpoint`` (atomic), ``load_checkpoint`` (weights_only + allow-list),
  ``resume_from`` (refuses to resume with settings that change the numbers).
- Reuse of finished work: ``fingerprint`` + ``read_finished`` / ``write_finished``.
- ``JsonlLog``: one JSON record per epoch, truncated consistently on resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from moca_eval import distributed
from moca_eval.checkpoint_io import read_checkpoint
from moca_eval.distributed import DistInfo
from moca_eval.errors import CheckpointError, ConfigError
from moca_eval.results import atomic_path, write_json_atomic

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pth"
LOG_NAME = "log.jsonl"
# What a training protocol writes in its run directory (the checkpoint first).
RUN_FILES = (CHECKPOINT_NAME, LOG_NAME, "results.json", "decodable-*.json")


Precision = Literal["fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class Runtime:
    """Where and how a process trains."""

    device: torch.device
    precision: Precision
    dist: DistInfo

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 or fp16 autocast per ``precision``; a no-op for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """fp16 only: a loss scaler starting at 65536 (MOCA's ``--init_scale``)."""
        if self.precision != "fp16":
            return None
        return torch.amp.GradScaler(self.device.type, init_scale=65536.0)


def resolve_device(name: str, info: DistInfo) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU; ``cuda`` under ``torchrun``:
    this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but no CUDA GPU is visible")
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
    return device


def resolve_precision(requested: str, device: torch.device, *, bf16_supported: bool | None = None
                      ) -> Precision:
    """``auto``: fp32 on CPU; bf16 on a GPU that has it (fp32's exponent range, no loss scaling),
    fp16 with a grad scaler on older GPUs."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    if device.type != "cuda":
        return "fp32"
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return "bf16" if bf16_supported else "fp16"


def make_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Join the ``torchrun`` group (gloo on CPU, NCCL on GPU) and resolve device and precision."""
    info = distributed.init_from_env(device)
    resolved = resolve_device(device, info)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    return Runtime(resolved, resolve_precision(precision, resolved), info)


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, *, clip_grad: float | None = None,
                   scaler: torch.amp.GradScaler | None = None) -> None:
    """Clip the global gradient norm at ``clip_grad`` (unscaled first in fp16), step, update the
    scaler (MOCA's ``NativeScalerWithGradNormCount``). Gradients are left for the caller to zero."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def backward(loss: torch.Tensor, scaler: torch.amp.GradScaler | None = None) -> None:
    """``loss.backward()``, scaled first when training in fp16."""
    (scaler.scale(loss) if scaler is not None else loss).backward()


def wrap_ddp(module: nn.Module, rt: Runtime, **options: Any) -> nn.Module:
    """``DistributedDataParallel`` (with ``options``) under ``torchrun``; the module itself alone."""
    if rt.dist.world_size == 1:
        return module
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, **options)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


def sync_grads(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce on the accumulation micro-steps before the last."""
    if sync or not isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes, in place (identity in a single process)."""
    if distributed.current().world_size > 1:
        dist.all_reduce(tensor)
    return tensor



# ----------------------------------------------------------------------------- seeds
def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)



# ----------------------------------------------------------------------------- batching
@dataclass(frozen=True)
class BatchPlan:
    """A global batch split into ``world_size`` processes x ``accum`` micro-batches."""

    global_batch: int
    micro_batch: int
    world_size: int

    @property
    def accum(self) -> int:
        return self.global_batch // (self.micro_batch * self.world_size)

    @property
    def local_batch(self) -> int:
        """Images one process sees per optimizer step."""
        return self.global_batch // self.world_size


def make_plan(global_batch: int, micro_batch: int | None, world_size: int) -> BatchPlan:
    """Validate the split; ``micro_batch=None`` (or one above the per-process batch): no accumulation."""
    if global_batch < 1 or global_batch % world_size:
        raise ConfigError(f"global batch {global_batch} is not divisible by the {world_size} processes")
    micro = min(micro_batch or global_batch, global_batch // world_size)
    if micro < 1 or global_batch % (micro * world_size):
        raise ConfigError(
            f"global batch {global_batch} is not a multiple of batch size {micro} x {world_size} "
            f"process(es); pick a --batch-size that divides {global_batch // world_size}"
        )
    return BatchPlan(global_batch, micro, world_size)


# ----------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write a training checkpoint atomically (main process only)."""
    if not distributed.current().is_main:
        return
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a training checkpoint with the safe loader (weights_only + allow-list)."""
    state = dict(read_checkpoint(path))
    missing = [k for k in ("epoch", "config") if k not in state]
    if missing:
        raise CheckpointError(f"{path}: not a moca-eval training checkpoint (no {', '.join(missing)})")
    return state


def resume_from(output_dir: Path | None, *, resume: bool, config: dict[str, Any]
                ) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None to start afresh.

    Raises:
        ConfigError: a checkpoint exists but ``resume`` is off (nothing is overwritten), or it
            was written with settings that change the numbers.
    """
    if output_dir is None:
        return None
    path = Path(output_dir) / CHECKPOINT_NAME
    if not path.exists():
        if resume:
            log.info("--resume: no checkpoint in %s yet, starting from scratch", output_dir)
        return None
    if not resume:
        raise ConfigError(f"{path}: a training checkpoint already exists; pass --resume to continue "
                          "it, or choose another --output-dir")
    state = load_checkpoint(path)
    saved = state["config"]
    changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if changed:
        diff = "; ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in changed[:4])
        raise ConfigError(f"{path}: cannot resume with different settings ({diff})")
    log.info("resuming from %s (epoch %d done)", path, state["epoch"])
    return state


def jsonable(obj: Any) -> Any:
    """Tuples to lists, Paths to strings: the form a config takes in JSON and checkpoints."""
    return json.loads(json.dumps(obj, default=str))


class JsonlLog:
    """Append-only JSON-lines log of epoch records (main process only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path if distributed.current().is_main else None

    def records(self) -> list[dict[str, Any]]:
        """The logged records; a torn last line (a kill or full disk mid-append) is dropped.

        Raises:
            ConfigError: a line before the last is not JSON (the log was edited or damaged).
        """
        if self.path is None or not self.path.exists():
            return []
        lines = [line for line in self.path.read_text(errors="replace").splitlines() if line.strip()]
        out = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
                out.append(record)
            except ValueError:
                if number < len(lines):
                    raise ConfigError(f"{self.path}: line {number} is not JSON; fix or remove the "
                                      "log to resume") from None
                log.warning("%s: dropped a torn last line (an interrupted write): %.60s", self.path, line)
        return out

    def truncate(self, start_epoch: int) -> None:
        """Drop records of epochs >= ``start_epoch`` (written after the checkpoint resumed from)."""
        if self.path is None:
            return
        keep = [r for r in self.records() if r.get("epoch", -1) < start_epoch]
        with atomic_path(self.path) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- reuse
def fingerprint(*parts: Any) -> str:
    """sha256 of the JSON of ``parts``: what a finished result depends on."""
    blob = json.dumps(jsonable(parts), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def read_finished(path: Path, key: str) -> dict[str, Any] | None:
    """The payload stored by ``write_finished`` under fingerprint ``key`` (else, or unreadable: None)."""
    try:
        stored = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(stored, dict) or stored.get("fingerprint") != key:
        return None
    return stored.get("payload") if isinstance(stored.get("payload"), dict) else None


def write_finished(path: Path, payload: dict[str, Any], key: str) -> None:
    """Store ``payload`` with its fingerprint, atomically (main process only)."""
    if distributed.current().is_main:
        write_json_atomic(path, {"fingerprint": key, "payload": payload})
