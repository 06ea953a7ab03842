"""The MOCA training loop: data, AdamW, schedules, DDP, logging, checkpoints and resumption.

``run(cfg)`` trains and writes into ``cfg.output_dir``: ``checkpoint-last.pth`` (MOCA's
layout) and ``teacher.pth`` after every epoch, ``log.jsonl`` (one line per step) and ``summary.json`` at
the end: the run's result record (``moca_eval.record``, protocol ``pretrain``). Device,
precision, process group, DDP, batch split, seeds and the log come from ``moca_eval.runtime``.
Under ``torchrun`` every process runs ``run(cfg)``; the global batch ``cfg.batch_size`` is split
between them and results do not depend on their number.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from moca_eval import distributed, outputs, runtime
from moca_eval.data import ImageFolderIndex
from moca_eval.errors import ConfigError
from moca_eval.pretrain import checkpoint, official
from moca_eval.pretrain.augment import TwoViews
from moca_eval.pretrain.config import PretrainConfig
from moca_eval.pretrain.data import GlobalBatchSampler, TwoViewDataset, find_images, image_root
from moca_eval.pretrain.model import MOCA, BatchSlice
from moca_eval.pretrain.schedules import apply_schedules, teacher_momentum
from moca_eval.pretrain.summary import pretrain_record
from moca_eval.protocols import training
from moca_eval.record import Clock, Record

log = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
SUMMARY_FILE = "summary.json"
# What pretraining writes in its run directory (its checkpoint first): see ``outputs.claim_run_dir``.
RUN_FILES = ("checkpoint-*.pth", "teacher.pth", LOG_FILE, SUMMARY_FILE, "decodable-*.json")
EPOCH_MEANS = ("loss", "loss_img", "loss_loc", "codebook_usage", "imgs_per_s")


@dataclass
class PretrainResult:
    """Where the run wrote its files, how its losses evolved (one entry per epoch), its record."""

    output_dir: Path
    checkpoint: Path
    teacher: Path
    log_file: Path
    epochs_done: int
    history: list[dict[str, float]] = field(default_factory=list)
    record: Record | None = None  # main process only
    skipped: list[str] = field(default_factory=list)  # undecodable images left out of training

    def to_dict(self) -> dict[str, Any]:
        """The result record (``summary.json``)."""
        return self.record.to_dict() if self.record is not None else {}


@dataclass
class _Run:
    """Everything one training process holds."""

    cfg: PretrainConfig
    rt: runtime.Runtime
    model: MOCA
    net: torch.nn.Module  # the model, DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    loader: DataLoader | None
    run_dir: Path | None
    scaler: torch.amp.GradScaler | None = None  # fp16 only
    skipped: list[str] = field(default_factory=list)  # undecodable images left out

    @property
    def where(self) -> BatchSlice:
        if self.rt.dist.world_size == 1:
            return BatchSlice()
        plan = runtime.make_plan(self.cfg.batch_size, None, self.rt.dist.world_size)
        return BatchSlice(offset=self.rt.dist.rank * plan.local_batch, global_batch=self.cfg.batch_size)


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


def build_loader(cfg: PretrainConfig, info: distributed.DistInfo, *, pin: bool,
                 paths: list[Path] | None = None) -> DataLoader:
    """Two-view loader yielding this process's slice of each global batch (of ``paths``, default:
    every image of ``cfg.data_dir``)."""
    runtime.make_plan(cfg.batch_size, None, info.world_size)  # refuses a batch they cannot share
    paths = find_images(cfg.data_dir) if paths is None else paths
    dataset = TwoViewDataset(paths, TwoViews(cfg.img_size, crop_min=cfg.crop_min), seed=cfg.seed)
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
    x1 = x1.to(run.rt.device, non_blocking=True)
    x2 = x2.to(run.rt.device, non_blocking=True)
    with run.rt.autocast():
        out = run.net(x1, x2, generator=step_generator(cfg.seed, step), where=run.where)
    losses = torch.stack([out.loss.detach(), out.loss_img, out.loss_loc]).float()
    loss, loss_img, loss_loc = (runtime.all_reduce_sum(losses) / run.rt.dist.world_size).tolist()
    if not math.isfinite(loss):
        raise RuntimeError(f"loss is {loss} at step {step} (L_IMG {loss_img}, L_LOC {loss_loc})")
    run.optimizer.zero_grad(set_to_none=True)
    runtime.backward(out.loss, run.scaler)
    runtime.optimizer_step(run.model, run.optimizer, clip_grad=cfg.clip_grad, scaler=run.scaler)
    return {"loss": loss, "loss_img": loss_img, "loss_loc": loss_loc, "tau": out.tau,
            "codebook_usage": out.codebook_usage, "lr": lr, "momentum": momentum}


def train_one_epoch(run: _Run, epoch: int, log: runtime.JsonlLog) -> None:
    """Run one epoch, writing one JSON line per step (main process)."""
    run.loader.batch_sampler.set_epoch(epoch)
    run.loader.dataset.epoch = epoch
    steps = len(run.loader)
    show = run.rt.dist.is_main and run.cfg.progress
    bar = tqdm(run.loader, total=steps, desc=f"epoch {epoch + 1}/{run.cfg.epochs}", disable=not show)
    last = time.perf_counter()
    for i, (x1, x2) in enumerate(bar):
        record = train_step(run, x1, x2, step=epoch * steps + i, t=epoch + i / steps)
        now = time.perf_counter()
        record = {"epoch": epoch, "step": epoch * steps + i, **record,
                  "imgs_per_s": run.cfg.batch_size / max(now - last, 1e-9)}
        last = now
        log.write(record)
        bar.set_postfix(loc=f"{record['loss_loc']:.3f}", img=f"{record['loss_img']:.3f}",
                        codes=record["codebook_usage"])


def prepare_run_dir(cfg: PretrainConfig, *, create: bool = True) -> Path:
    """The output directory; an existing checkpoint there needs ``resume``, and ``resume`` needs a
    checkpoint or a pretraining run directory (one killed before its first checkpoint restarts)."""
    if not cfg.output_dir:
        raise ConfigError("no output directory given (--output-dir RUN_DIR)")
    run_dir = Path(cfg.output_dir)
    has_checkpoint = (run_dir / checkpoint.CHECKPOINT).exists()
    if has_checkpoint and not cfg.resume:
        raise ConfigError(f"{run_dir}: already holds {checkpoint.CHECKPOINT}; pass --resume to "
                          "continue that run or choose another --output-dir")
    started = has_checkpoint or cfg.resume_from or outputs.run_dir_owner(run_dir) == "pretrain"
    if cfg.resume and not started:
        raise ConfigError(f"{run_dir / checkpoint.CHECKPOINT}: nothing to resume (no checkpoint); drop "
                          "--resume to start anew")
    if create:
        outputs.claim_run_dir(run_dir, "pretrain", own_files=RUN_FILES)
    return run_dir


def usable_images(cfg: PretrainConfig, run_dir: Path, *, strict: bool) -> tuple[list[Path], list[str]]:
    """The decodable images of ``cfg.data_dir`` and the undecodable ones (relative paths), decoded
    once before training (remembered in the run directory for a resume).

    Raises:
        DatasetError: ``strict`` and an image cannot be decoded.
    """
    root = image_root(cfg.data_dir)
    index = ImageFolderIndex(root, [], [(path, 0) for path in find_images(cfg.data_dir)])
    kept, skipped = training.drop_undecodable(index, num_workers=cfg.num_workers, strict=strict,
                                              record=run_dir / "decodable-train.json")
    return [path for path, _ in kept.samples], skipped


def read_log(path: Path) -> list[dict[str, Any]]:
    """The step records of a run's ``log.jsonl``."""
    return runtime.JsonlLog(path).records()


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


def _setup(cfg: PretrainConfig, *, strict: bool) -> _Run:
    rt = runtime.make_runtime(cfg.device, cfg.precision)
    runtime.make_plan(cfg.batch_size, None, rt.dist.world_size)  # before the run directory is made
    images = find_images(cfg.data_dir)  # a missing or empty folder fails before the run dir is made
    log.info("pretraining on %d images of %s", len(images), image_root(cfg.data_dir))
    run_dir = prepare_run_dir(cfg, create=rt.dist.is_main)  # every rank checks, so all fail alike
    distributed.barrier()
    paths, skipped = usable_images(cfg, run_dir, strict=strict)
    loader = build_loader(cfg, rt.dist, pin=rt.device.type == "cuda", paths=paths)
    runtime.seed_all(cfg.seed)
    model = MOCA(cfg).to(rt.device)
    optimizer = build_optimizer(model, cfg)
    net = runtime.wrap_ddp(model, rt, broadcast_buffers=False)
    return _Run(cfg, rt, model, net, optimizer, loader, run_dir, rt.grad_scaler(), skipped)


def run(cfg: PretrainConfig, *, strict: bool = False) -> PretrainResult:
    """Pretrain MOCA per ``cfg`` (resuming when ``cfg.resume``); see the module docstring.
    ``strict``: an undecodable image is an error (else it is left out and recorded)."""
    cfg = cfg.validate()
    clock = Clock()
    state = _setup(cfg, strict=strict)
    start = 0
    if cfg.resume and not cfg.resume_from and not (state.run_dir / checkpoint.CHECKPOINT).is_file():
        logging.getLogger(__name__).info("%s: killed before its first checkpoint; starting anew",
                                         state.run_dir)
    elif cfg.resume:
        start = checkpoint.load_for_resume(state.run_dir, cfg, model=state.model,
                                           optimizer=state.optimizer, scaler=state.scaler)
        if state.rt.dist.is_main and start > 0:  # a kill between the two files: teacher.pth follows
            checkpoint.save_teacher(state.run_dir / checkpoint.TEACHER, state.model)
    log = runtime.JsonlLog(state.run_dir / LOG_FILE)
    log.truncate(start)  # drop steps after the checkpoint (all of them when starting anew)
    for epoch in range(start, cfg.epochs):
        train_one_epoch(state, epoch, log)
        if state.rt.dist.is_main:
            checkpoint.save_checkpoint(state.run_dir, model=state.model, optimizer=state.optimizer,
                                       epoch=epoch, cfg=cfg, world_size=state.rt.dist.world_size,
                                       scaler=state.scaler)
        distributed.barrier()
    return _finish(state, clock)


def _finish(state: _Run, clock: Clock) -> PretrainResult:
    run_dir, is_main = state.run_dir, state.rt.dist.is_main
    log_path = run_dir / LOG_FILE
    history = epoch_history(read_log(log_path)) if is_main else []
    result = PretrainResult(run_dir, run_dir / checkpoint.CHECKPOINT, run_dir / checkpoint.TEACHER,
                            log_path, state.cfg.epochs, history, skipped=state.skipped)
    if is_main:
        result.record = pretrain_record(state.cfg, result, rt=state.rt, clock=clock)
        result.record.write(run_dir / SUMMARY_FILE)
    return result
