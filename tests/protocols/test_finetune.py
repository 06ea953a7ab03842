"""Fine-tuning: MAE's layer-decay rule, model surgery, RandAugment compatibility, learning, resume."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from moca_eval import runtime
from moca_eval.checkpoints import load_backbone
from moca_eval.demo import make_demo_data, save_random_moca_checkpoint
from moca_eval.errors import ConfigError
from moca_eval.features import ExtractConfig
from moca_eval.models import ARCHS, ArchSpec, build_vit
from moca_eval.pipeline import BackboneConfig, DataConfig, FeatureJob
from moca_eval.protocols import finetune, linear, training
from moca_eval.protocols.finetune import build_model, build_optimizer, finetune_recipe, posterize_keep0
from moca_eval.record import validate_record

ARCH = ArchSpec(embed_dim=64, depth=2, num_heads=1, patch_size=8, img_size=64)


def mae_layer_id(name: str, depth: int) -> int:
    """MAE ``util/lr_decay.get_layer_id_for_vit``, as PROTOCOLS.md states it."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_layer_decay_groups_follow_maes_rule_for_every_vit_base_parameter():
    depth, decay, lr = 12, 0.65, 4e-3
    model = build_vit(ARCHS["vit_base"], global_pool="avg", fc_norm=True, num_classes=1000,
                      drop_path_rate=0.2)
    optimizer = build_optimizer(model, finetune_recipe("moca"), lr)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    name_of = {id(p): n for n, p in model.named_parameters()}
    got = {name_of[id(p)]: (g["lr_scale"], g["weight_decay"])
           for g in optimizer.param_groups for p in g["params"]}
    assert sorted(got) == sorted(name_of.values())  # every parameter, exactly once
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(got) == 152
    for name, param in model.named_parameters():
        scale = decay ** (depth + 1 - mae_layer_id(name, depth))
        # MAE: no decay on 1-D parameters and on model.no_weight_decay() (pos_embed, cls_token)
        wd = 0.0 if param.ndim == 1 or name in ("pos_embed", "cls_token") else 0.05
        assert got[name] == (pytest.approx(scale, rel=1e-12), wd), name
    assert got["head.weight"][0] == 1.0 and got["blocks.11.mlp.fc1.weight"][0] == pytest.approx(0.65)
    assert got["patch_embed.proj.weight"][0] == pytest.approx(0.65**13)
    training.apply_lr(optimizer, 0, training.Schedule(total_steps=10))
    assert all(g["lr"] / g["lr_scale"] == pytest.approx(lr) for g in optimizer.param_groups)


def test_moca_recipe_is_the_papers():
    r = finetune_recipe("moca")
    assert (r.blr, r.batch_size, r.epochs, r.warmup_epochs, r.min_lr) == (1e-3, 1024, 100, 5, 1e-6)
    assert (r.weight_decay, r.layer_decay, r.drop_path, r.betas) == (0.05, 0.65, 0.2, (0.9, 0.999))
    assert (r.smoothing, r.mixup, r.cutmix, r.reprob) == (0.1, 0.8, 1.0, 0.25)
    assert (r.auto_augment, r.global_pool, r.head_init_std) == ("rand-m9-mstd0.5-inc1", "avg", 2e-5)
    assert finetune_recipe("mae", blr=1e-4).blr == 1e-4 and finetune_recipe("mae").blr == 5e-4
    with pytest.raises(ConfigError, match="did you mean"):
        finetune_recipe("mocca")


def test_model_keeps_backbone_weights_with_fresh_fc_norm_and_head(tmp_path):
    ckpt = save_random_moca_checkpoint(tmp_path / "c.pth", arch=ARCH)
    backbone = load_backbone(ckpt, img_size=32)
    weights = backbone.model.state_dict()
    torch.manual_seed(0)
    model = build_model(backbone, 7, finetune_recipe("moca"))
    mine = model.state_dict()
    assert all(torch.equal(mine[k], v) for k, v in weights.items() if not k.startswith("norm."))
    assert not any(k.startswith("norm.") for k in mine)  # MAE deletes the final norm ...
    assert torch.equal(mine["fc_norm.weight"], torch.ones(64)) and not mine["fc_norm.bias"].any()  # ... fresh
    assert 1.5e-5 < model.head.weight.std().item() < 2.5e-5 and not model.head.bias.any()
    assert model.global_pool == "avg" and model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    token = build_model(backbone, 7, finetune_recipe("ibot"))
    assert token.global_pool == "token" and torch.equal(token.norm.weight, weights["norm.weight"])


def test_posterize_keeps_old_pillow_semantics():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    pixels = np.asarray(img)
    for bits in range(0, 9):
        expected = pixels & (~(2 ** (8 - bits) - 1) & 0xFF)
        assert np.array_equal(np.asarray(posterize_keep0(img, bits)), expected), bits
    transform = finetune.train_transform(32, finetune_recipe("moca"))
    ops = [op for step in transform.transforms for op in getattr(step, "ops", ())]
    posterize = [op for op in ops if op.name == "PosterizeIncreasing"]
    assert posterize and all(op.aug_fn is posterize_keep0 for op in posterize)
    strongest = replace_op(posterize[0])
    assert np.asarray(strongest(img)).max() == 0  # magnitude 10 keeps 0 bits: black, no error


def replace_op(op):
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0
    return op


@pytest.fixture(scope="module")
def random_job(tmp_path_factory) -> FeatureJob:
    root = tmp_path_factory.mktemp("finetune")
    data = make_demo_data(root / "data", train_per_class=60, val_per_class=30)
    ckpt = save_random_moca_checkpoint(root / "random.pth", arch=ARCH)
    return FeatureJob(BackboneConfig(ckpt, img_size=32), DataConfig(data),
                      ExtractConfig(batch_size=100, num_workers=0, device="cpu", cache_dir=root / "cache"))


def test_finetuning_beats_the_linear_probe_of_the_same_checkpoint(random_job):
    probe = linear.run(linear.LinearConfig(random_job, linear.linear_recipe("moca", epochs=30, batch_size=50),
                                           mode="cached"))
    # Tiny settings: 600 images from scratch-like weights learn nothing in a few epochs under
    # mixup/RandAugment/layer decay 0.65, so those are lightened here (the recipe code is the same).
    recipe = finetune_recipe("moca", epochs=20, batch_size=20, blr=2e-2, warmup_epochs=1, mixup=0.0,
                             cutmix=0.0, reprob=0.0, layer_decay=0.9, drop_path=0.0, auto_augment="")
    tuned = finetune.run(finetune.FinetuneConfig(random_job, recipe))
    assert tuned.best_top1 > probe.selected.val_top1 + 5, (tuned.history, probe.selected)
    assert tuned.last_top1 == tuned.history[-1]["top1"] and len(tuned.history) == 20
    out = tuned.to_dict()
    validate_record(out)
    validate_record(probe.to_dict())
    values, history = out["metrics"]["values"], out["metrics"]["rows"]
    assert values["best_top1"] == max(h["top1"] for h in history) and out["config"]["accum"] == 1
    assert out["config"]["recipe"]["why"] == "given" and out["config"]["recipe"]["values"]["epochs"] == 20


def test_interrupted_and_resumed_finetuning_ends_with_the_same_weights(tmp_path, run_interrupted):
    """The full recipe (RandAugment, random erasing, mixup/cutmix, drop path) with accumulation."""
    data = make_demo_data(tmp_path / "data", train_per_class=8, val_per_class=2)
    ckpt = save_random_moca_checkpoint(tmp_path / "c.pth", arch=ARCH)
    job = FeatureJob(BackboneConfig(ckpt, img_size=32), DataConfig(data),
                     ExtractConfig(batch_size=8, num_workers=0, device="cpu"))
    cfg = finetune.FinetuneConfig(job, finetune_recipe("moca", epochs=3, batch_size=16, warmup_epochs=1),
                                  output_dir=tmp_path / "full")
    full = finetune.run(cfg)
    cut = replace(cfg, output_dir=tmp_path / "cut")
    run_interrupted(finetune.run, cut, 2)
    resumed = finetune.run(replace(cut, resume=True))
    a = runtime.load_checkpoint(tmp_path / "full" / runtime.CHECKPOINT_NAME)
    b = runtime.load_checkpoint(tmp_path / "cut" / runtime.CHECKPOINT_NAME)
    assert a["epoch"] == b["epoch"] == 3 and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(b["model"][k], v) for k, v in a["model"].items())
    states = zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values())
    moments = [(s[m], t[m]) for s, t in states for m in ("exp_avg", "exp_avg_sq")]
    assert len(moments) == 2 * len(a["model"]) and all(torch.equal(x, y) for x, y in moments)
    assert resumed.history == full.history and resumed.record.config["resumed_from_epoch"] == 2
    assert full.record.config["accum"] == 2
    assert full.to_dict()["metrics"]["headline"]["value"] == full.history[-1]["top1"]
