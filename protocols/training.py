"""Shared machinery of the trained protocols (linear probe, fine-tuning; reusable by pretraining).

- Runtime: device, precision (bf16 autocast on GPU) and the ``torchrun`` process group.
- Batching: ``BatchPlan`` + ``epoch_batches``: step ``s`` of epoch ``e`` trains on the same images
  whatever the number of processes and accumulation steps (so results and checkpoints do not
  depend on how many GPUs ran them).
- Reproducibility: every random draw is a function of (seed, epoch, step or image): the per-image
  augmentations (``SeededImageDataset``) and the per-step randomness of the main process
  (``seed_step``). An epoch therefore replays exactly after a resume, with no RNG state to save.
- Schedules: ``cosine_lr`` per optimizer step (linear warm-up, then half-cosine), applied to every
  param group as ``lr(step, group['peak_lr']) * group.get('lr_scale', 1)``.
- Checkpoints: ``save_checkpoint`` (atomic: temp file + ``os.replace``), ``load_checkpoint``
  (``moca_eval.checkpoint_io.read_checkpoint``: weights_only with the allow-list), ``resume_from``.
- ``JsonlLog``: one JSON record per epoch, truncated consistently on resume.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from moca_eval import distributed
from moca_eval.checkpoint_io import read_checkpoint
from moca_eval.data import ImageDataset, ImageFolderIndex, collate_skip_bad
from moca_eval.distributed import DistInfo
from moca_eval.errors import CheckpointError, ConfigError
from moca_eval.features import ExtractConfig
from moca_eval.results import atomic_path

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "checkpoint.pth"
LOG_NAME = "log.jsonl"


# ----------------------------------------------------------------------------- runtime
@dataclass(frozen=True)
class Runtime:
    """Where and how a process trains."""

    device: torch.device
    precision: Literal["fp32", "bf16"]
    dist: DistInfo

    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16 autocast when ``precision`` is bf16, a no-op otherwise."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")


def make_runtime(extract: ExtractConfig) -> Runtime:
    """Join the ``torchrun`` group (gloo on CPU, NCCL on GPU) and resolve device and precision."""
    info = distributed.init_from_env(extract.device)
    device = extract.resolved_device()
    if device.type == "cuda":
        if device.index is None:  # "--device cuda" under torchrun: this process's GPU
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return Runtime(device, extract.resolved_precision(), info)


def wrap_ddp(module: nn.Module, rt: Runtime) -> nn.Module:
    """``DistributedDataParallel`` under ``torchrun``; the module itself in a single process."""
    if rt.dist.world_size == 1:
        return module
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


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


def progress(iterable: Iterable, *, total: int, desc: str, rt: Runtime) -> Iterable:
    """tqdm on the main process when stderr is a terminal."""
    return tqdm(iterable, total=total, desc=desc, unit="step", leave=False,
                disable=None if rt.dist.is_main else True)


# ----------------------------------------------------------------------------- seeds
def derive_seed(*parts: int) -> int:
    """A well-mixed 32-bit seed from non-negative integers (numpy's SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's and Python's global generators."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def seed_step(seed: int, epoch: int, step: int, micro: int, rank: int) -> None:
    """Main-process randomness of one micro-step (drop path, mixup) from its coordinates."""
    seed_all(derive_seed(seed, epoch, step, micro, rank, 1))


class SeededImageDataset(ImageDataset):
    """``ImageDataset`` whose keys are ``(row, epoch)``: each augmentation draw depends on
    (seed, epoch, row) only, not on workers, processes or what was loaded before."""

    def __init__(self, index: ImageFolderIndex, transform: Any, *, seed: int) -> None:
        super().__init__(index, transform)
        self.seed = seed

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor | None, int]:
        row, epoch = key
        seed_all(derive_seed(self.seed, epoch, row, 2))
        return super().__getitem__(row)


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


def steps_per_epoch(num_rows: int, plan: BatchPlan) -> int:
    """Full global batches per epoch (the last partial one is dropped)."""
    steps = num_rows // plan.global_batch
    if steps == 0:
        raise ConfigError(f"global batch {plan.global_batch} exceeds the {num_rows} training images; "
                          "lower --global-batch")
    return steps


def epoch_batches(rows: np.ndarray, plan: BatchPlan, *, seed: int, epoch: int, rank: int
                  ) -> list[list[np.ndarray]]:
    """This process's micro-batches for every step of ``epoch``: ``[step][micro] -> rows``.

    The epoch's permutation depends on (seed, epoch) only; step ``s`` covers permuted positions
    ``[s * G, (s + 1) * G)``, of which process ``r`` takes the ``r``-th contiguous slice.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, 3))
    perm = np.asarray(rows)[torch.randperm(len(rows), generator=gen).numpy()]
    local, micro = plan.local_batch, plan.micro_batch
    out = []
    for step in range(steps_per_epoch(len(rows), plan)):
        mine = perm[step * plan.global_batch + rank * local:][:local]
        out.append([mine[i * micro:(i + 1) * micro] for i in range(plan.accum)])
    return out


def image_loader(dataset: SeededImageDataset, micro_batches: Sequence[np.ndarray], *, epoch: int,
                 num_workers: int, rt: Runtime) -> DataLoader:
    """Loads the given micro-batches in order; yields ``(images, rows, bad_rows)``."""
    batches = [[(int(r), epoch) for r in mb] for mb in micro_batches]
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                      collate_fn=collate_skip_bad, pin_memory=rt.device.type == "cuda")


def grouped(items: Iterable, size: int) -> Iterator[list]:
    """Consecutive groups of ``size`` (the accumulation micro-batches of one step)."""
    group: list = []
    for item in items:
        group.append(item)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


# ----------------------------------------------------------------------------- schedules
@dataclass(frozen=True)
class Schedule:
    """Per-step learning-rate schedule: linear warm-up from ``warmup_lr``, cosine to ``min_lr``."""

    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0
    warmup_lr: float = 0.0


def cosine_lr(step: int, peak: float, sched: Schedule) -> float:
    """The learning rate at optimizer step ``step`` (0-based) for a group peaking at ``peak``."""
    if step < sched.warmup_steps:
        return sched.warmup_lr + (peak - sched.warmup_lr) * step / sched.warmup_steps
    span = max(1, sched.total_steps - sched.warmup_steps)
    progress_ = min(1.0, (step - sched.warmup_steps) / span)
    return sched.min_lr + (peak - sched.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress_))


def apply_lr(optimizer: torch.optim.Optimizer, step: int, sched: Schedule) -> float:
    """Set every group's lr for ``step``; returns the largest."""
    top = 0.0
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(step, group["peak_lr"], sched) * group.get("lr_scale", 1.0)
        top = max(top, group["lr"])
    return top


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
        if self.path is None or not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]

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
