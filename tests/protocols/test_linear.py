"""Linear probe: the head grid, honest selection, cached vs augmented mode, resume, CLI."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from moca_eval import runtime
from moca_eval.data import eval_transform, load_split, open_rgb
from moca_eval.demo import make_demo_data
from moca_eval.errors import ConfigError
from moca_eval.features import ExtractConfig
from moca_eval.models import ArchSpec, build_vit
from moca_eval.pipeline import BackboneConfig, DataConfig, FeatureJob, extract_splits
from moca_eval.protocols import linear, linear_heads, training
from moca_eval.protocols.linear import LR_GRID, holdout_split, linear_recipe
from moca_eval.protocols.linear_heads import GridSGD, HeadGrid, grid_loss

# One head at width 64: the loader's head-count rule gives the same network back.
ARCH = ArchSpec(embed_dim=64, depth=2, num_heads=1, patch_size=8, img_size=32)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_demo_data(tmp_path_factory.mktemp("linear") / "data", train_per_class=60, val_per_class=30)


def pretrain_tiny_vit(data: Path, out: Path, *, steps: int = 300) -> Path:
    """A tiny ViT trained (supervised, center crops + flips) on the demo train split and saved in
    MOCA's full layout: a backbone whose features carry the classes, unlike a random one."""
    torch.manual_seed(0)
    index = load_split(data, "train")
    to_tensor = eval_transform(ARCH.img_size)
    images = torch.stack([to_tensor(open_rgb(path)) for path, _ in index.samples])
    labels = torch.as_tensor(index.labels)
    model = build_vit(ARCH, num_classes=len(index.classes), global_pool="avg", fc_norm=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    for _ in range(steps):
        batch = torch.randint(0, len(images), (64,))
        flip = torch.rand(64, 1, 1, 1) < 0.5
        x = torch.where(flip, images[batch].flip(-1), images[batch])
        loss = F.cross_entropy(model(x), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    layout = {f"{prefix}{k}": v for prefix in ("encoder_teacher.", "encoder.") for k, v in weights.items()}
    torch.save({"model": layout, "epoch": 1}, out)
    return out


@pytest.fixture(scope="module")
def job(data, tmp_path_factory) -> FeatureJob:
    root = tmp_path_factory.mktemp("linear-ckpt")
    ckpt = pretrain_tiny_vit(data, root / "tiny-trained.pth")
    return FeatureJob(BackboneConfig(ckpt, img_size=ARCH.img_size), DataConfig(data),
                      ExtractConfig(batch_size=100, num_workers=0, device="cpu", cache_dir=root / "cache"))


def test_lr_grid_is_the_moca_ibot_sweep():
    expected = [m * 10.0**e for e in range(-4, 1) for m in range(1, 10)]
    assert len(LR_GRID) == 45 and LR_GRID == pytest.approx(expected, rel=1e-12)
    moca = linear.LINEAR_RECIPES.get("moca")
    assert (moca.blr, moca.batch_size, moca.epochs, moca.momentum) == (0.04, 1024, 100, 0.9)
    assert moca.features == ("cls", "avg", "cls+avg") and moca.head_lrs == LR_GRID


def test_head_grid_trains_every_head_as_if_it_were_alone():
    torch.manual_seed(0)
    dims, lrs, scale = {"cls": 6, "cls+avg": 12}, (0.01, 0.5, 3.0), 0.5
    grid = HeadGrid(dims, lrs, 4)
    alone = {(f, lr): copy.deepcopy(grid.heads[i][j]) for i, f in enumerate(dims) for j, lr in enumerate(lrs)}
    grid_opt = torch.optim.SGD(grid.param_groups(scale), lr=0.0, momentum=0.9)
    opts = {key: torch.optim.SGD(head.parameters(), lr=0.0, momentum=0.9) for key, head in alone.items()}
    sched = training.Schedule(total_steps=5, warmup_steps=1)
    for step in range(5):
        feats = {f: torch.randn(8, d) for f, d in dims.items()}
        labels = torch.randint(0, 4, (8,))
        training.apply_lr(grid_opt, step, sched)
        grid_loss(grid(feats), labels, 8).backward()
        grid_opt.step()
        grid_opt.zero_grad()
        for (f, lr), head in alone.items():
            opts[(f, lr)].param_groups[0]["lr"] = training.cosine_lr(step, lr * scale, sched)
            F.cross_entropy(head(feats[f]), labels).backward()
            opts[(f, lr)].step()
            opts[(f, lr)].zero_grad()
    for i, f in enumerate(dims):
        for j, lr in enumerate(lrs):
            torch.testing.assert_close(grid.heads[i][j].weight, alone[(f, lr)].weight, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(grid.heads[i][j].bias, alone[(f, lr)].bias, rtol=1e-5, atol=1e-6)
    assert [g["head"] for g in grid_opt.param_groups][:2] == ["cls@0.01", "cls@0.5"]


def test_concatenated_heads_equal_separate_heads_in_logits_and_gradients():
    torch.manual_seed(0)
    heads = HeadGrid({"cls": 7}, (0.1, 1.0, 5.0), 4).heads[0]
    x, labels = torch.randn(5, 7), torch.randint(0, 4, (5,))
    separate = [F.cross_entropy(head(x), labels, reduction="sum") / 5 for head in heads]
    reference = [torch.autograd.grad(loss, list(head.parameters())) for loss, head in zip(separate, heads)]
    logits = linear_heads.concat_heads(x, heads)
    assert logits.shape == (5, 3, 4)
    torch.testing.assert_close(logits, torch.stack([head(x) for head in heads], dim=1))
    grads = torch.autograd.grad(grid_loss(logits, labels, 5), list(heads.parameters()))
    for got, want in zip(grads, [g for pair in reference for g in pair]):
        torch.testing.assert_close(got, want)


def test_grid_sgd_is_torch_sgd_with_all_groups_in_one_pass():
    torch.manual_seed(0)
    grids = [HeadGrid({"cls": 5, "avg": 3}, (0.01, 0.3, 2.0), 4) for _ in range(2)]
    grids[1].load_state_dict(grids[0].state_dict())
    ours = GridSGD(grids[0].param_groups(0.5), lr=0.1, momentum=0.9)
    ref = torch.optim.SGD(grids[1].param_groups(0.5), lr=0.1, momentum=0.9)
    for step in range(4):
        feats = {"cls": torch.randn(6, 5), "avg": torch.randn(6, 3)}
        labels = torch.randint(0, 4, (6,))
        for grid, opt in zip(grids, (ours, ref)):
            training.apply_lr(opt, step, training.Schedule(total_steps=4))
            logits = grid(feats)
            logits = logits[:, :3] if step == 1 else logits  # some heads without gradient
            grid_loss(logits, labels, 6).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    a, b = grids[0].state_dict(), grids[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ours.state_dict()["state"].keys() == ref.state_dict()["state"].keys()
    for k, v in ref.state_dict()["state"].items():
        assert torch.equal(ours.state_dict()["state"][k]["momentum_buffer"], v["momentum_buffer"])


def test_grid_lars_is_maes_lars_per_head():
    """Weights follow timm's LARS (MAE's rule without weight decay), biases plain SGD, per head."""
    from timm.optim import Lars

    torch.manual_seed(0)
    grids = [HeadGrid({"cls": 5, "avg": 3}, (0.01, 0.3, 2.0), 4, batch_norm=True) for _ in range(2)]
    grids[1].load_state_dict(grids[0].state_dict())
    init = {k: v.clone() for k, v in grids[0].state_dict().items()}
    ours = GridSGD(grids[0].param_groups(2.0), lr=0.1, momentum=0.9, trust_coefficient=1e-3)
    ref_groups = []
    for group in grids[1].param_groups(2.0):
        weight, bias = group["params"]
        ref_groups += [{**group, "params": [weight], "always_adapt": True},
                       {**group, "params": [bias], "always_adapt": False}]
    ref = Lars(ref_groups, lr=0.1, momentum=0.9, trust_coeff=1e-3, eps=0.0)
    for step in range(5):
        feats = {"cls": torch.randn(8, 5), "avg": torch.randn(8, 3)}
        labels = torch.randint(0, 4, (8,))
        for grid, opt in zip(grids, (ours, ref)):
            training.apply_lr(opt, step, training.Schedule(total_steps=5, warmup_steps=2))
            grid_loss(grid(feats), labels, 8).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    a, b = grids[0].state_dict(), grids[1].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7, msg=k)
    assert all(not torch.equal(a[k], init[k]) for k in a if k.startswith("heads."))
    assert linear.LINEAR_RECIPES.get("mae").optimizer == "lars"


def test_mae_head_norm_is_batchnorm_without_affine():
    torch.manual_seed(0)
    grid = HeadGrid({"cls": 5}, (0.1, 1.0), 3, batch_norm=True)
    assert sum(p.numel() for p in grid.norms.parameters()) == 0
    x = torch.randn(16, 5) * 3 + 2
    normed = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-6)
    for j, head in enumerate(grid.heads[0]):
        torch.testing.assert_close(grid({"cls": x})[:, j], normed @ head.weight.T + head.bias)
    assert linear.LINEAR_RECIPES.get("mae").head_norm == "bn"


def test_holdout_split_is_stratified_disjoint_and_seeded():
    labels = np.repeat(np.arange(5), [10, 20, 3, 1, 40])
    train, held = holdout_split(labels, 0.1, seed=0)
    assert np.bincount(labels[held], minlength=5).tolist() == [1, 2, 1, 0, 4]
    assert sorted(np.concatenate([train, held]).tolist()) == list(range(len(labels)))
    assert np.array_equal(held, holdout_split(labels, 0.1, seed=0)[1])
    assert not np.array_equal(held, holdout_split(labels, 0.1, seed=1)[1])


@pytest.mark.parametrize("name, overrides", [
    ("moca", {}),
    # LARS moves a weight by about lr x 1e-3 of its norm per step: larger lrs for this short run
    ("mae", {"lr_grid": (1.0, 3.0, 10.0, 30.0, 100.0)}),
])
def test_cached_mode_reaches_sklearn_logistic_regression(job, name, overrides):
    recipe = linear_recipe(name, epochs=60, batch_size=64, features=("avg",), warmup_epochs=0, **overrides)
    result = linear.run(linear.LinearConfig(job, recipe, mode="cached"))
    train, val = extract_splits(job, ["avg"], job.backbone.load(), job.data.splits())  # cache hits
    rows, held = holdout_split(train.labels, 0.1, seed=0)  # the rows the heads trained on
    sk = LogisticRegression(max_iter=5000).fit(train.features["avg"][rows], train.labels[rows])
    sk_top1 = 100 * sk.score(val.features["avg"], val.labels)
    assert sk_top1 > 25  # the features carry the classes (chance: 10%)
    assert result.selected.val_top1 >= sk_top1 - 4, (result.selected, sk_top1)
    out = result.to_dict()
    config, metrics = out["config"], out["metrics"]
    assert (config["mode"], config["select_on"], config["n_holdout"]) == ("cached", "holdout", 60)
    assert len(metrics["rows"]) == len(recipe.lr_grid)
    best_holdout = max(h["holdout_top1"] for h in metrics["rows"])
    assert metrics["values"]["selected"]["holdout_top1"] == best_holdout
    assert metrics["headline"]["value"] == metrics["values"]["top1"] == result.selected.val_top1


def test_augmented_mode_learns(job):
    recipe = linear_recipe("moca", epochs=4, batch_size=32)
    result = linear.run(linear.LinearConfig(job, recipe, mode="augmented", micro_batch=16))
    assert result.selected.val_top1 > 20, result.selected  # chance: 10%
    out = result.to_dict()
    assert out["config"]["mode"] == "augmented" and len(out["metrics"]["rows"]) == 135
    assert (out["config"]["micro_batch"], out["config"]["accum"]) == (16, 2)


def test_augmented_path_with_center_crops_reproduces_cached_mode(job, tmp_path, monkeypatch):
    """With the random crops swapped for the eval transform, per-batch backbone passes must give
    the heads of the cached features: same batches, same features, same updates."""
    recipe = linear_recipe("moca", epochs=2, batch_size=32, features=("cls", "avg"), lr_grid=(0.05, 1.0))
    cfg = linear.LinearConfig(job, recipe, mode="cached", output_dir=tmp_path / "cached")
    cached = linear.run(cfg)
    monkeypatch.setattr(linear, "train_augmentation", lambda size, interpolation: eval_transform(size))
    augmented = linear.run(replace(cfg, mode="augmented", micro_batch=8, output_dir=tmp_path / "aug"))
    a = runtime.load_checkpoint(tmp_path / "cached" / runtime.CHECKPOINT_NAME)["heads"]
    b = runtime.load_checkpoint(tmp_path / "aug" / runtime.CHECKPOINT_NAME)["heads"]
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    assert [h.val_top1 for h in augmented.heads] == pytest.approx([h.val_top1 for h in cached.heads], abs=0.5)


def test_interrupted_and_resumed_run_ends_with_the_same_heads(job, tmp_path, run_interrupted):
    recipe = linear_recipe("moca", epochs=3, batch_size=32, features=("avg",), lr_grid=(0.1, 1.0))
    cfg = linear.LinearConfig(job, recipe, mode="augmented", micro_batch=32, output_dir=tmp_path / "full")
    full = linear.run(cfg)
    cut = replace(cfg, output_dir=tmp_path / "cut")
    run_interrupted(linear.run, cut, 1)
    with pytest.raises(ConfigError, match="--resume"):
        linear.run(cut)
    with pytest.raises(ConfigError, match="cannot resume with different settings"):
        linear.run(replace(cut, resume=True, recipe=replace(recipe, epochs=4)))
    resumed = linear.run(replace(cut, resume=True))
    a = runtime.load_checkpoint(tmp_path / "full" / runtime.CHECKPOINT_NAME)
    b = runtime.load_checkpoint(tmp_path / "cut" / runtime.CHECKPOINT_NAME)
    assert a["heads"].keys() == b["heads"].keys()
    assert all(torch.equal(a["heads"][k], b["heads"][k]) for k in a["heads"])
    momentum = [(s["momentum_buffer"], t["momentum_buffer"])
                for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())]
    assert len(momentum) == 4 and all(torch.equal(x, y) for x, y in momentum)
    assert resumed.heads == full.heads and resumed.record.config["resumed_from_epoch"] == 1
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]


def test_cli_select_on_val_and_json(job, tmp_path):
    from moca_eval.cli import main

    out = tmp_path / "linear.json"
    argv = ["linear", "--ckpt", str(job.backbone.ckpt), "--data", str(job.data.root), "--img-size", "32",
            "--mode", "cached", "--epochs", "5", "--global-batch", "64", "--features", "avg", "cls",
            "--lrs", "0.01", "0.1", "1", "--select-on", "val", "--num-workers", "0", "--device", "cpu",
            "--cache-dir", str(job.extract.cache_dir), "--output-dir", str(tmp_path / "run"),
            "--output", str(out)]
    assert main(argv) == 0
    payload = json.loads(out.read_text())
    config, heads = payload["config"], payload["metrics"]["rows"]
    assert (payload["protocol"], config["mode"], config["select_on"]) == ("linear", "cached", "val")
    assert config["n_holdout"] == 0 and config["n_train"] == 600 and len(heads) == 6
    assert payload["metrics"]["headline"]["value"] == max(h["val_top1"] for h in heads)
    assert payload["checkpoint"]["sha256"] and payload["provenance"]["packages"]["torch"]
    assert config["recipe"]["values"]["lr_grid"] == [0.01, 0.1, 1.0] and config["world_size"] == 1
    assert config["recipe"]["name"] == "moca" and "family moca" in config["recipe"]["why"]
    assert (tmp_path / "run" / "log.jsonl").exists() and main(argv) == 2  # refuses to overwrite
