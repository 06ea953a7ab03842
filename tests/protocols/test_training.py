"""Shared training machinery: schedules, global batches, seeding, checkpoints, logs, and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.scheduler import CosineLRScheduler

from moca_eval import runtime
from moca_eval.data import load_split
from moca_eval.demo import make_demo_data, save_random_moca_checkpoint
from moca_eval.errors import CheckpointError, ConfigError
from moca_eval.models import ArchSpec
from moca_eval.protocols import training


@pytest.mark.parametrize("warmup,min_lr,warmup_lr", [(0, 0.0, 0.0), (7, 1e-6, 0.0), (5, 1e-6, 1e-6)])
def test_cosine_lr_matches_timm_scheduler_per_group(warmup, min_lr, warmup_lr):
    total, peak = 40, 0.5
    sched = training.Schedule(total, warmup, min_lr, warmup_lr)
    for scale in (1.0, 0.65**3):
        param = torch.nn.Parameter(torch.zeros(1))
        ours = torch.optim.SGD([{"params": [param], "peak_lr": peak, "lr_scale": scale}], lr=peak)
        ref_opt = torch.optim.SGD([{"params": [param], "lr_scale": scale}], lr=peak)
        ref = CosineLRScheduler(ref_opt, t_initial=total - warmup, lr_min=min_lr, warmup_t=warmup,
                                warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=False)
        for step in range(total + 3):
            ref.step_update(step)
            training.apply_lr(ours, step, sched)
            assert ours.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-9,
                                                                abs=1e-15)


def test_cosine_lr_known_values():
    sched = training.Schedule(total_steps=10, warmup_steps=2)
    assert training.cosine_lr(0, 1.0, sched) == 0.0
    assert training.cosine_lr(1, 1.0, sched) == 0.5
    assert training.cosine_lr(2, 1.0, sched) == 1.0
    assert training.cosine_lr(6, 1.0, sched) == pytest.approx(0.5)
    assert training.cosine_lr(10, 1.0, sched) == pytest.approx(0.0)


@pytest.mark.parametrize("world,micro", [(1, 2), (1, 8), (2, 2), (4, 1), (2, 4)])
def test_global_batches_do_not_depend_on_processes_or_accumulation(world, micro):
    rows = np.arange(100, 143)  # 43 rows: 5 full global batches of 8, 3 rows dropped
    ref = training.epoch_batches(rows, runtime.make_plan(8, None, 1), seed=3, epoch=2, rank=0)
    plan = runtime.make_plan(8, micro, world)
    per_rank = [training.epoch_batches(rows, plan, seed=3, epoch=2, rank=r) for r in range(world)]
    assert len(ref) == 5 and all(len(p) == 5 for p in per_rank)
    for step in range(5):
        (single,) = ref[step]
        parts = [mb for r in range(world) for mb in per_rank[r][step]]
        assert all(len(mb) == micro for mb in parts) and len(parts) == world * plan.accum
        assert np.array_equal(np.concatenate(parts), single)  # same images, same order
    seen = np.concatenate([b[0] for b in ref])
    assert len(set(seen.tolist())) == 40 and set(seen.tolist()) <= set(rows.tolist())
    other = training.epoch_batches(rows, runtime.make_plan(8, None, 1), seed=3, epoch=3, rank=0)
    assert not np.array_equal(other[0][0], ref[0][0])


def test_batch_plan_errors_name_the_numbers():
    assert runtime.make_plan(1024, 128, 2).accum == 4
    assert runtime.make_plan(64, 128, 1).micro_batch == 64  # no accumulation needed
    with pytest.raises(ConfigError, match="batch size 48 x 2"):
        runtime.make_plan(256, 48, 2)
    with pytest.raises(ConfigError, match="exceeds the 10 training images"):
        training.steps_per_epoch(10, runtime.make_plan(16, None, 1))


def test_seeded_dataset_draws_depend_on_seed_epoch_and_row_only(tmp_path):
    data = make_demo_data(tmp_path / "d", train_per_class=2, val_per_class=1, num_classes=2)
    from torchvision import transforms as T

    aug = T.Compose([T.RandomResizedCrop(16), T.ToTensor()])
    ds = training.SeededImageDataset(load_split(data, "train"), aug, seed=5)
    first = [ds[(r, 1)][0] for r in range(4)]
    backwards = [ds[(r, 1)][0] for r in reversed(range(4))][::-1]
    torch.manual_seed(123)  # the global state must not matter
    again = ds[(2, 1)][0]
    assert all(torch.equal(a, b) for a, b in zip(first, backwards))
    assert torch.equal(again, first[2])
    assert not torch.equal(ds[(2, 2)][0], first[2])


def test_checkpoint_is_atomic_and_read_safely(tmp_path, monkeypatch):
    path = tmp_path / "run" / runtime.CHECKPOINT_NAME
    state = {"epoch": 1, "config": {"a": [1, 2]}, "w": torch.arange(3.0)}
    runtime.save_checkpoint(path, state)
    loaded = runtime.load_checkpoint(path)
    assert loaded["epoch"] == 1 and torch.equal(loaded["w"], state["w"])

    def broken_save(obj, f):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        runtime.save_checkpoint(path, {"epoch": 2, "config": {}})
    assert runtime.load_checkpoint(path)["epoch"] == 1  # the old one is intact
    assert sorted(p.name for p in path.parent.iterdir()) == [runtime.CHECKPOINT_NAME]
    (tmp_path / "x.pth").write_bytes(b"garbage")
    with pytest.raises(CheckpointError):
        runtime.load_checkpoint(tmp_path / "x.pth")


def test_resume_from_rules(tmp_path):
    assert runtime.resume_from(tmp_path, resume=True, config={"a": 1}) is None
    runtime.save_checkpoint(tmp_path / runtime.CHECKPOINT_NAME, {"epoch": 3, "config": {"a": 1, "b": 2}})
    with pytest.raises(ConfigError, match="pass --resume"):
        runtime.resume_from(tmp_path, resume=False, config={"a": 1, "b": 2})
    with pytest.raises(ConfigError, match="b: 2 -> 5"):
        runtime.resume_from(tmp_path, resume=True, config={"a": 1, "b": 5})
    assert runtime.resume_from(tmp_path, resume=True, config={"a": 1, "b": 2})["epoch"] == 3


def test_jsonl_log_truncates_epochs_after_the_checkpoint(tmp_path):
    log = runtime.JsonlLog(tmp_path / "log.jsonl")
    for epoch in range(4):
        log.write({"epoch": epoch, "loss": float(epoch)})
    log.truncate(2)
    log.write({"epoch": 2, "loss": 9.0})
    assert [r["epoch"] for r in log.records()] == [0, 1, 2]
    assert json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])["loss"] == 9.0


# ----------------------------------------------------------------------------- DDP (gloo, 2 processes)
WORKER = Path(__file__).with_name("ddp_cli_worker.py")


def test_two_process_gloo_run_matches_one_process(tmp_path):
    """``torchrun --nproc_per_node 2`` of both CLIs ends with the weights of a 1-process run."""
    from moca_eval.cli import main

    data = make_demo_data(tmp_path / "data", train_per_class=12, val_per_class=4)
    ckpt = save_random_moca_checkpoint(tmp_path / "ck.pth", seed=1, arch=ArchSpec(
        embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=64))
    common = ["--ckpt", str(ckpt), "--data", str(data), "--img-size", "32", "--num-workers", "0",
              "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    linear = ["linear", *common, "--mode", "cached", "--epochs", "3", "--global-batch", "16",
              "--features", "cls", "avg", "--lrs", "0.01", "0.3"]
    finetune = ["finetune", *common, "--epochs", "1", "--global-batch", "16", "--batch-size", "4",
                "--mixup", "0", "--cutmix", "0", "--drop-path", "0", "--warmup-epochs", "0.5",
                "--blr", "0.01"]
    runs = {"linear": linear, "finetune": finetune}
    argvs = [[*argv, "--output-dir", str(tmp_path / f"{name}-2p")] for name, argv in runs.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(WORKER), json.dumps(argvs)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name, argv in runs.items():
        assert main([*argv, "--output-dir", str(tmp_path / f"{name}-1p")]) == 0
        one = runtime.load_checkpoint(tmp_path / f"{name}-1p" / runtime.CHECKPOINT_NAME)
        two = runtime.load_checkpoint(tmp_path / f"{name}-2p" / runtime.CHECKPOINT_NAME)
        key = "heads" if name == "linear" else "model"
        assert one[key].keys() == two[key].keys()
        for k, v in one[key].items():
            torch.testing.assert_close(two[key][k], v, rtol=1e-4, atol=2e-5, msg=f"{name} {k}")
        world = json.loads((tmp_path / f"{name}-2p" / "results.json").read_text())["config"]["world_size"]
        assert world == 2
