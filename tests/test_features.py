"""Feature variants from one pass, against direct computations on timm's own forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moca_eval.checkpoints import load_backbone
from moca_eval.data import eval_transform, load_split
from moca_eval.demo import make_demo_data, save_random_moca_checkpoint
from moca_eval.errors import ConfigError
from moca_eval.features import ExtractConfig, check_feature_name, compute_features, extract_features
from moca_eval.models import ArchSpec, build_vit

ARCH = ArchSpec(embed_dim=64, depth=3, num_heads=2, patch_size=8, img_size=32, reg_tokens=2,
                no_embed_class=True, init_values=0.5)


def test_compute_features_matches_direct_definitions() -> None:
    torch.manual_seed(0)
    model = build_vit(ARCH).eval()
    x = torch.randn(3, 3, 32, 32)
    feats = compute_features(model, x, ["cls", "avg", "cls+avg", "avg-prenorm", "cls-prenorm", "cls-last2"])
    with torch.no_grad():
        tokens = model.forward_features(x)  # timm: blocks then final norm
        inter = model.forward_intermediates(x, indices=2, norm=False, intermediates_only=True,
                                            output_fmt="NLC", return_prefix_tokens=True)
        h = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
        pre = model.blocks(h)
    patches = tokens[:, 1 + ARCH.reg_tokens:]  # registers excluded
    assert torch.allclose(feats["cls"], tokens[:, 0], atol=1e-6)
    assert torch.allclose(feats["avg"], patches.mean(1), atol=1e-6)
    assert torch.allclose(feats["cls+avg"], torch.cat([tokens[:, 0], patches.mean(1)], 1), atol=1e-6)
    assert torch.allclose(feats["avg-prenorm"], pre[:, 1 + ARCH.reg_tokens:].mean(1), atol=1e-6)
    assert torch.allclose(feats["cls-prenorm"], pre[:, 0], atol=1e-6)
    last2 = torch.cat([model.norm(inter[i][1][:, 0]) for i in range(2)], dim=1)
    assert torch.allclose(feats["cls-last2"], last2, atol=1e-5)
    assert feats["cls-last2"].shape == (3, 128)


def test_unknown_feature_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown feature 'mean'"):
        check_feature_name("mean")


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("feat")
    data = make_demo_data(root / "data", train_per_class=3, val_per_class=2, image_size=32)
    ckpt = save_random_moca_checkpoint(root / "ckpt.pth", arch=ArchSpec(
        embed_dim=64, depth=2, num_heads=2, patch_size=8, img_size=32))
    return data, ckpt


def test_extract_features_in_dataset_order_equal_to_per_image_forward(tiny_setup, tmp_path) -> None:
    data, ckpt = tiny_setup
    backbone = load_backbone(ckpt, img_size=32)
    index = load_split(data, "val")
    cfg = ExtractConfig(batch_size=7, num_workers=0, cache_dir=None)
    got = extract_features(backbone, index, ["avg", "cls"], cfg)
    transform = eval_transform(32)
    from PIL import Image

    for i in (0, 5, len(index) - 1):
        img = transform(Image.open(index.samples[i][0]).convert("RGB"))[None]
        want = compute_features(backbone.model, img, ["avg"])["avg"][0].numpy()
        assert np.abs(got.features["avg"][i] - want).max() < 1e-5
    assert got.paths == index.relpaths() and got.labels.tolist() == index.labels


def test_feature_cache_is_reused_and_corrupt_entry_rebuilt(tiny_setup, tmp_path, monkeypatch) -> None:
    import moca_eval.features as features

    data, ckpt = tiny_setup
    backbone = load_backbone(ckpt, img_size=32)
    index = load_split(data, "val")
    cfg = ExtractConfig(batch_size=8, num_workers=0, cache_dir=tmp_path / "cache")
    first = extract_features(backbone, index, ["avg", "cls"], cfg)
    calls = []
    real = features._run_backbone
    monkeypatch.setattr(features, "_run_backbone", lambda *a, **k: calls.append(a[2]) or real(*a, **k))
    again = extract_features(backbone, index, ["cls"], cfg)
    assert calls == [] and np.array_equal(again.features["cls"], first.features["cls"])
    for npz in (tmp_path / "cache").glob("*.npz"):  # corrupt every entry: must be detected
        npz.write_bytes(npz.read_bytes()[:-10] + b"0123456789")
    rebuilt = extract_features(backbone, index, ["avg"], cfg)
    assert calls == [["avg"]]
    assert np.array_equal(rebuilt.features["avg"], first.features["avg"])


def test_cache_key_changes_with_transform_and_dataset(tiny_setup, tmp_path) -> None:
    from moca_eval.feature_cache import cache_key

    data, ckpt = tiny_setup
    backbone = load_backbone(ckpt, img_size=32)
    index = load_split(data, "val")
    base = cache_key(backbone, index, eval_transform(32), "avg", "fp32")
    assert base != cache_key(backbone, index, eval_transform(32, interpolation="bilinear"), "avg", "fp32")
    assert base != cache_key(backbone, index, eval_transform(32), "avg", "bf16")
    assert base != cache_key(backbone, index.subset(range(5)), eval_transform(32), "avg", "fp32")


def test_cpu_bf16_runs_a_bf16_copy_close_to_fp32_and_leaves_the_backbone_fp32(tiny_setup) -> None:
    data, ckpt = tiny_setup
    backbone = load_backbone(ckpt, img_size=32)
    index = load_split(data, "val")
    run = {p: extract_features(backbone, index, ["avg", "cls"], ExtractConfig(
        num_workers=0, device="cpu", precision=p, cache_dir=None), transform=eval_transform(32))
        for p in ("fp32", "bf16")}
    assert all(p.dtype == torch.float32 for p in backbone.model.parameters())
    for name in ("avg", "cls"):
        a, b = run["fp32"].features[name], run["bf16"].features[name]
        assert b.dtype == np.float32 and not np.array_equal(a, b)  # really computed in bf16
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        assert cos.min() > 0.999, cos.min()
