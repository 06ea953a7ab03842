"""The MOCA training loop: data, AdamW, schedules, DDP, logging, checkpoints and resumption.

``run(cfg)`` trains and writes into ``cfg.output_dir``: ``checkpoint-last.pth`` (MOCA's
layout) and ``teacher.pth`` after every epoch, ``log.jsonl`` (one line per step) and
``summary.json`` at the end. Under ``torchrun`` every process runs ``run(cfg)``; the global
batch ``cfg.batch_size`` is split between them and results do not depend on their number.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from moca_eval import distributed
from moca_eval.errors import ConfigError
from moca_eval.pretrain import checkpoint, official
from moca_eval.pretrain.augment import TwoViews
from moca_eval.pretrain.config import PretrainConfig
from moca_eval.pretrain.data import GlobalBatchSampler, TwoViewDataset, find_images
from moca_eval.pretrain.model import MOCA, BatchSlice
from moca_eval.pretrain.schedules import apply_schedules, teacher_momentum
from moca_eval.results import provenance, write_json_atomic

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
EPOCH_MEANS = ("loss", "loss_img", "loss_loc", "codebook_usage", "imgs_per_s")


@dataclass
class PretrainResult:
    """Where the run wrote its files and how its losses evolved (one entry per epoch)."""

    output_dir: Path
    checkpoint: Path
    teacher: Path
    log_file: Path
    epochs_done: int
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"output_dir": str(self.output_dir), "checkpoint": str(self.checkpoint),
                "teacher": str(self.teacher), "log_file": str(self.log_file),
                "epochs_done": self.epochs_done, "history": self.history}


@dataclass
class _Run:
    """Everything one training process holds."""

    cfg: PretrainConfig
    info: distributed.DistInfo
    device: torch.device
    model: MOCA
    net: torch.nn.Module  # the model, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    run_dir: Path
    scaler: torch.amp.GradScaler | None = None  # fp16 only

    @property
    def where(self) -> BatchSlice:
        if self.info.world_size == 1:
            return BatchSlice()
        local = self.cfg.batch_size // self.info.world_size
        return BatchSlice(offset=self.info.rank * local, global_batch=self.cfg.batch_size)


def resolve_device(name: str, info: distributed.DistInfo) -> torch.device:
    """``auto``: this process's GPU when there is one, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and info.world_size > 1:
        name = f"cuda:{info.local_rank}"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but no CUDA GPU is visible")
    return torch.device(name)


def resolve_precision(cfg: PretrainConfig, device: torch.device, *,
                      bf16_supported: bool | None = None) -> str:
    """``fp32``, ``bf16`` or ``fp16`` for this run.

    ``auto``: bf16 on a GPU that has it (fp32's exponent range, so no loss scaling and no
    skipped steps), fp16 with a grad scaler (MOCA's own setting) on older GPUs, fp32 on CPU.
    """
    if cfg.precision != "auto":
        return cfg.precision
    if device.type != "cuda":
        return "fp32"
    if bf16_supported is None:
        bf16_supported = torch.cuda.is_bf16_supported()
    return "bf16" if bf16_supported else "fp16"


def autocast(cfg: PretrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of ``resolve_precision`` (a no-op for fp32)."""
    precision = resolve_precision(cfg, device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def grad_scaler(cfg: PretrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 only: a ``GradScaler`` with MOCA's initial scale 65536 (``--init_scale``)."""
    if resolve_precision(cfg, device) != "fp16":
        return None
    return torch.amp.GradScaler(device.type, init_scale=65536.0)


def optimizer_step(model: torch.nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer, *,
                   clip_grad: float | None, scaler: torch.amp.GradScaler | None = None) -> None:
    """Backward, clip the global gradient norm at ``clip_grad`` (unscaled first), AdamW step:
    MOCA's ``NativeScalerWithGradNormCount`` with a scaler, ``misc.backward`` without one."""
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_grad:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def build_optimizer(model: MOCA, cfg: PretrainConfig) -> torch.optim.AdamW:
    """AdamW (0.9, 0.999) with MOCA's four groups: (generator or not) x (decay or not).

    Biases and 1-D parameters (norms) get no weight decay; the prototype generators
    (``*_pred.``) get their own constant learning rate ``lr_prototypes``. Parameters are
    taken in MOCA's model order, so ``state_dict()`` indexes them as MOCA's optimizer does.
    """
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, param in official.official_order(model.named_parameters()):
        if not param.requires_grad:
            continue
        is_wgen = name.startswith(("encoder_pred.", "decoder_pred."))
        use_wd = not (param.ndim <= 1 or name.endswith(".bias"))
        groups.setdefault((is_wgen, use_wd), []).append(param)
    param_groups = [
        {"params": groups.get((wgen, wd), []), "is_wgen": wgen, "use_wd": wd,
         "weight_decay": cfg.weight_decay if wd else 0.0}
        for wgen in (False, True) for wd in (False, True)
    ]
    return torch.optim.AdamW(param_groups, lr=cfg.base_lr(), betas=(0.9, 0.999))


def build_loader(cfg: PretrainConfig, info: distributed.DistInfo, *, pin: bool) -> DataLoader:
    """Two-view loader yielding this process's slice of each global batch."""
    if cfg.batch_size % info.world_size:
        raise ConfigError(f"batch size {cfg.batch_size} is not divisible by {info.world_size} processes")
    dataset = TwoViewDataset(find_images(cfg.data_dir), TwoViews(cfg.img_size, crop_min=cfg.crop_min),
                             seed=cfg.seed)
    sampler = GlobalBatchSampler(len(dataset), global_batch=cfg.batch_size, rank=info.rank,
                                 world_size=info.world_size, seed=cfg.seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, pin_memory=pin)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of step ``step`` (masks, codebook picks), the same on every process."""
    return torch.Generator().manual_seed((seed % 2**31) * 2**32 + step)


def train_step(run: _Run, x1: torch.Tensor, x2: torch.Tensor, *, step: int, t: float) -> dict[str, float]:
    """One optimisation step at fractional epoch ``t``; returns the logged statistics.

    As MOCA's loop: schedules, the teacher's EMA with this step's momentum (before its
    forward), targets and losses, backward, gradient clipping, AdamW.
    """
    cfg = run.cfg
    lr = apply_schedules(run.optimizer, cfg, t)
    momentum = teacher_momentum(cfg, t)
    run.model.update_teacher(momentum)
    x1 = x1.to(run.device, non_blocking=True)
    x2 = x2.to(run.device, non_blocking=True)
    with autocast(cfg, run.device):
        out = run.net(x1, x2, generator=step_generator(cfg.seed, step), where=run.where)
    losses = torch.stack([out.loss.detach(), out.loss_img, out.loss_loc]).float()
    if run.info.world_size > 1:
        torch.distributed.all_reduce(losses)
        losses /= run.info.world_size
    loss, loss_img, loss_loc = losses.tolist()
    if not math.isfinite(loss):
        raise RuntimeError(f"loss is {loss} at step {step} (L_IMG {loss_img}, L_LOC {loss_loc})")
    optimizer_step(run.model, out.loss, run.optimizer, clip_grad=cfg.clip_grad, scaler=run.scaler)
    return {"loss": loss, "loss_img": loss_img, "loss_loc": loss_loc, "tau": out.tau,
            "codebook_usage": out.codebook_usage, "lr": lr, "momentum": momentum}


def train_one_epoch(run: _Run, epoch: int, log_file: Any) -> None:
    """Run one epoch, writing one JSON line per step (main process)."""
    run.loader.batch_sampler.set_epoch(epoch)
    run.loader.dataset.epoch = epoch
    steps = len(run.loader)
    show = run.info.is_main and run.cfg.progress
    bar = tqdm(run.loader, total=steps, desc=f"epoch {epoch + 1}/{run.cfg.epochs}", disable=not show)
    last = time.perf_counter()
    for i, (x1, x2) in enumerate(bar):
        record = train_step(run, x1, x2, step=epoch * steps + i, t=epoch + i / steps)
        now = time.perf_counter()
        record = {"epoch": epoch, "step": epoch * steps + i, **record,
                  "imgs_per_s": run.cfg.batch_size / max(now - last, 1e-9)}
        last = now
        if log_file is not None:
            log_file.write(json.dumps(record) + "\n")
            log_file.flush()
        bar.set_postfix(loc=f"{record['loss_loc']:.3f}", img=f"{record['loss_img']:.3f}",
                        codes=record["codebook_usage"])


def prepare_run_dir(cfg: PretrainConfig, *, create: bool = True) -> Path:
    """The output directory; an existing checkpoint there needs ``resume``."""
    if not cfg.output_dir:
        raise ConfigError("no output directory given (--output RUN_DIR)")
    run_dir = Path(cfg.output_dir)
    if (run_dir / checkpoint.CHECKPOINT).exists() and not cfg.resume:
        raise ConfigError(f"{run_dir}: already holds {checkpoint.CHECKPOINT}; pass --resume to "
                          "continue that run or choose another --output")
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def read_log(path: Path, *, before_epoch: int | None = None) -> list[dict[str, Any]]:
    """The step records of ``log.jsonl`` (only epochs ``< before_epoch`` if given)."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if before_epoch is None or r["epoch"] < before_epoch]


def epoch_history(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per-epoch means of the step records (tau/lr: last value of the epoch)."""
    history = []
    for epoch in sorted({r["epoch"] for r in records}):
        rows = [r for r in records if r["epoch"] == epoch]
        entry = {"epoch": epoch, "steps": len(rows)}
        entry.update({k: sum(r[k] for r in rows) / len(rows) for k in EPOCH_MEANS})
        entry.update({k: rows[-1][k] for k in ("tau", "lr", "momentum")})
        history.append(entry)
    return history


def _setup(cfg: PretrainConfig) -> _Run:
    info = distributed.init_from_env(cfg.device)
    device = resolve_device(cfg.device, info)
    loader = build_loader(cfg, info, pin=device.type == "cuda")
    run_dir = prepare_run_dir(cfg, create=info.is_main)  # every rank checks, so all fail alike
    distributed.barrier()
    torch.manual_seed(cfg.seed)
    model = MOCA(cfg).to(device)
    optimizer = build_optimizer(model, cfg)
    net: torch.nn.Module = model
    if info.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)
    return _Run(cfg, info, device, model, net, optimizer, loader, run_dir, grad_scaler(cfg, device))


def run(cfg: PretrainConfig) -> PretrainResult:
    """Pretrain MOCA per ``cfg`` (resuming when ``cfg.resume``); see the module docstring."""
    cfg = cfg.validate()
    state = _setup(cfg)
    start = 0
    if cfg.resume:
        start = checkpoint.load_for_resume(state.run_dir, cfg, model=state.model,
                                           optimizer=state.optimizer, scaler=state.scaler)
    log_path = state.run_dir / LOG_FILE
    log_file = None
    if state.info.is_main:
        kept = read_log(log_path, before_epoch=start)  # drop steps after the checkpoint
        log_path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        log_file = log_path.open("a")
    started = time.time()
    try:
        for epoch in range(start, cfg.epochs):
            train_one_epoch(state, epoch, log_file)
            if state.info.is_main:
                checkpoint.save_checkpoint(state.run_dir, model=state.model, optimizer=state.optimizer,
                                           epoch=epoch, cfg=cfg, world_size=state.info.world_size,
                                           scaler=state.scaler)
            distributed.barrier()
    finally:
        if log_file is not None:
            log_file.close()
    return _finish(state, log_path, wall_s=time.time() - started)


def _finish(state: _Run, log_path: Path, *, wall_s: float) -> PretrainResult:
    cfg = state.cfg
    history = epoch_history(read_log(log_path)) if state.info.is_main else []
    result = PretrainResult(state.run_dir, state.run_dir / checkpoint.CHECKPOINT,
                            state.run_dir / checkpoint.TEACHER, log_path, cfg.epochs, history)
    if state.info.is_main:
        write_json_atomic(state.run_dir / SUMMARY_FILE, {
            "config": cfg.to_dict(), "world_size": state.info.world_size, "wall_time_s": wall_s,
            **result.to_dict(), "provenance": provenance()})
    return result
