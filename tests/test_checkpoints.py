"""load_backbone: the original projects' own fixture files reproduce their features, and every
documented layout (built here from a random timm ViT) loads to exactly the same function."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from layouts import LAYOUT_ARCH, SMALL, layout_checkpoint, prefixed, random_vit
from safetensors.torch import save_file

from moca_eval.checkpoint_formats import FORMATS_BY_NAME
from moca_eval.checkpoints import infer_arch, load_backbone
from moca_eval.features import compute_features
from moca_eval.models import ArchSpec, build_vit, sincos_pos_embed

FIXTURES = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason=f"{FIXTURES} not present "
                                    "(the project's shared fixtures are only in the dev checkout)")
TOL = 1e-5

# (folder, file, student): every fixture file and which weights it should yield.
FIXTURE_FILES = [
    ("MOCA", "checkpoint-last.pth", "moca-full"),
    ("MOCA", "teacher-last.pth", "model-wrapped"),
    ("dino", "checkpoint.pth", "dino-full"),
    ("dino", "dino_vittiny16_pretrain.pth", "bare"),
    ("mae", "checkpoint-799.pth", "mae-full"),
    ("mae", "mae_pretrain_vit_tiny.pth", "model-wrapped"),
    ("dinov2", "teacher_checkpoint.pth", "dinov2-train"),
    ("dinov2", "dinov2_vittiny14_reg4_pretrain.pth", "dinov2-hub"),
]


def _features(model: torch.nn.Module, x: torch.Tensor, names: list[str]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in compute_features(model, x, names).items()}


def _patch_tokens(model, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model.forward_features(x)[:, model.num_prefix_tokens:].numpy()


@needs_fixtures
@pytest.mark.parametrize(("folder", "name", "fmt"), FIXTURE_FILES)
def test_fixture_checkpoint_reproduces_reference_features(folder: str, name: str, fmt: str) -> None:
    inputs = torch.from_numpy(np.load(FIXTURES / "inputs.npy"))
    expected = np.load(FIXTURES / folder / "expected.npz")
    backbone = load_backbone(FIXTURES / folder / name)
    assert backbone.format == fmt
    feats = _features(backbone.model, inputs, ["cls", "avg"])
    assert np.abs(feats["cls"] - expected["cls"]).max() <= TOL
    assert np.abs(feats["avg"] - expected["avg"]).max() <= TOL
    assert np.abs(_patch_tokens(backbone.model, inputs) - expected["patch"]).max() <= TOL


@needs_fixtures
@pytest.mark.parametrize(("folder", "name"), [("MOCA", "checkpoint-last.pth"), ("dino", "checkpoint.pth")])
def test_fixture_student_flag_gives_student_features(folder: str, name: str) -> None:
    inputs = torch.from_numpy(np.load(FIXTURES / "inputs.npy"))
    expected = np.load(FIXTURES / folder / "expected.npz")
    teacher = _features(load_backbone(FIXTURES / folder / name).model, inputs, ["cls"])
    student = _features(load_backbone(FIXTURES / folder / name, student=True).model, inputs, ["cls", "avg"])
    assert np.abs(student["cls"] - expected["student_cls"]).max() <= TOL
    assert np.abs(student["avg"] - expected["student_avg"]).max() <= TOL
    assert np.abs(teacher["cls"] - expected["student_cls"]).max() > 0.1  # the control differs


@needs_fixtures
def test_fixture_prenorm_variants_match_reference() -> None:
    inputs = torch.from_numpy(np.load(FIXTURES / "inputs.npy"))
    mae = _features(load_backbone(FIXTURES / "mae" / "checkpoint-799.pth").model, inputs, ["avg-prenorm"])
    assert np.abs(mae["avg-prenorm"] - np.load(FIXTURES / "mae" / "expected.npz")["avg_prenorm"]).max() <= TOL
    dinov2 = load_backbone(FIXTURES / "dinov2" / "teacher_checkpoint.pth")
    got = _features(dinov2.model, inputs, ["cls-prenorm"])["cls-prenorm"]
    assert np.abs(got - np.load(FIXTURES / "dinov2" / "expected.npz")["prenorm_cls"]).max() <= TOL


@needs_fixtures
def test_fixture_architecture_is_inferred_from_weights() -> None:
    moca = load_backbone(FIXTURES / "MOCA" / "checkpoint-last.pth")
    assert (moca.arch.embed_dim, moca.arch.depth, moca.arch.num_heads, moca.arch.patch_size) == (96, 4, 3, 16)
    assert moca.pos_embed == "sincos" and moca.family == "moca"
    dinov2 = load_backbone(FIXTURES / "dinov2" / "dinov2_vittiny14_reg4_pretrain.pth")
    assert (dinov2.arch.patch_size, dinov2.arch.reg_tokens, dinov2.arch.init_values) == (14, 4, 1.0)
    assert dinov2.pos_embed == "learned"


# ---------------------------------------------------------------- layouts built from PROTOCOLS.md
def test_every_registered_format_has_a_layout_test() -> None:
    assert set(FORMATS_BY_NAME) == set(_LAYOUT_NAMES)


_LAYOUT_NAMES = ["moca-full", "mae-full", "model-wrapped", "dino-full", "ibot-full", "dinov2-train",
                 "state-dict-wrapped", "mocov3", "msn", "dinov2-hub", "bare"]


def _check_same_function(loaded: torch.nn.Module, source: torch.nn.Module, arch: ArchSpec) -> None:
    x = torch.randn(2, 3, arch.img_size, arch.img_size, generator=torch.Generator().manual_seed(3))
    got = _features(loaded, x, ["cls", "avg", "avg-prenorm"])
    ref = _features(source, x, ["cls", "avg", "avg-prenorm"])
    for name in got:
        assert np.abs(got[name] - ref[name]).max() <= 1e-5, name


@pytest.mark.parametrize("fmt", _LAYOUT_NAMES)
def test_documented_layout_is_detected_and_loads_exactly(fmt: str, tmp_path: Path) -> None:
    arch = LAYOUT_ARCH.get(fmt, SMALL)
    teacher, student = random_vit(arch, 0), random_vit(arch, 1)
    ckpt, _ = layout_checkpoint(fmt, teacher.state_dict(), student.state_dict())
    path = tmp_path / "ckpt.pth"
    torch.save(ckpt, path)
    backbone = load_backbone(path, img_size=arch.img_size)
    assert backbone.format == fmt
    assert backbone.arch.num_heads == arch.num_heads  # MoCo-v3 ViT-S: 12 heads, by format hint
    _check_same_function(backbone.model, teacher, arch)
    if FORMATS_BY_NAME[fmt].has_student:
        _check_same_function(load_backbone(path, img_size=arch.img_size, student=True).model, student, arch)


def test_safetensors_file_loads_as_bare_state_dict(tmp_path: Path) -> None:
    source = random_vit(SMALL, 0)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    backbone = load_backbone(path, img_size=32)
    assert backbone.format == "bare"
    _check_same_function(backbone.model, source, SMALL)


def test_checkpoint_key_takes_state_dict_under_custom_key(tmp_path: Path) -> None:
    source = random_vit(SMALL, 0)
    path = tmp_path / "custom.pth"
    torch.save({"my_weights": prefixed(source.state_dict(), "module.backbone."), "step": 5}, path)
    backbone = load_backbone(path, img_size=32, checkpoint_key="my_weights")
    assert backbone.format == "custom-key"
    _check_same_function(backbone.model, source, SMALL)


def test_sincos_pos_embed_is_recomputed_exactly_at_another_resolution(tmp_path: Path) -> None:
    source = random_vit(SMALL, 0, sincos=True)
    path = tmp_path / "t.pth"
    torch.save({"model": source.state_dict()}, path)
    backbone = load_backbone(path, img_size=64)
    assert backbone.pos_embed == "sincos" and backbone.arch.img_size == 64
    assert torch.allclose(backbone.model.pos_embed, sincos_pos_embed(96, 8), atol=1e-6)
    assert not backbone.model.pos_embed.requires_grad


def test_learned_pos_embed_is_resampled_to_eval_resolution(tmp_path: Path) -> None:
    from timm.layers import resample_abs_pos_embed

    source = random_vit(SMALL, 0)
    path = tmp_path / "t.pth"
    torch.save(source.state_dict(), path)
    backbone = load_backbone(path, img_size=48)
    want = resample_abs_pos_embed(source.pos_embed.detach(), new_size=[6, 6], old_size=[4, 4],
                                  num_prefix_tokens=1)
    assert backbone.pos_embed == "learned"
    assert torch.equal(backbone.model.pos_embed.detach(), want)
    assert backbone.model(torch.randn(1, 3, 48, 48)).shape == (1, 96)


def test_infer_arch_reads_width_depth_patch_mlp_and_head_rule() -> None:
    arch = ArchSpec(embed_dim=96, depth=3, num_heads=3, patch_size=14, img_size=28, mlp_ratio=2.0)
    spec = infer_arch(build_vit(arch).state_dict())
    assert (spec.embed_dim, spec.depth, spec.num_heads, spec.patch_size, spec.img_size, spec.mlp_ratio) == (
        96, 3, 3, 14, 28, 2.0)
    assert infer_arch(build_vit(ArchSpec(embed_dim=768, depth=1, num_heads=12)).state_dict()).num_heads == 12


def test_dinov2_without_registers_uses_dinov2_offset_interpolation(tmp_path: Path) -> None:
    arch = ArchSpec(embed_dim=96, depth=1, num_heads=3, patch_size=14, img_size=518, init_values=0.1)
    source = random_vit(arch, 0)
    sd = {**source.state_dict(), "mask_token": torch.zeros(1, 96)}  # hub layout, 37x37 table
    torch.save(sd, tmp_path / "hub.pth")
    backbone = load_backbone(tmp_path / "hub.pth", img_size=224)
    grid = sd["pos_embed"][:, 1:].reshape(1, 37, 37, 96).permute(0, 3, 1, 2)
    want = torch.nn.functional.interpolate(grid, scale_factor=(16.1 / 37, 16.1 / 37), mode="bicubic",
                                           antialias=False).permute(0, 2, 3, 1).reshape(1, 256, 96)
    assert backbone.format == "dinov2-hub" and backbone.arch.img_size == 224
    assert torch.allclose(backbone.model.pos_embed[:, 1:].detach(), want)
    assert torch.equal(backbone.model.pos_embed[:, :1].detach(), sd["pos_embed"][:, :1])


def test_num_heads_override_sets_heads_for_nonstandard_width(tmp_path: Path) -> None:
    arch = ArchSpec(embed_dim=96, depth=1, num_heads=2, patch_size=8, img_size=32)  # rule says 3
    source = random_vit(arch, 0)
    torch.save(source.state_dict(), tmp_path / "two_heads.pth")
    assert load_backbone(tmp_path / "two_heads.pth", img_size=32).arch.num_heads == 3
    backbone = load_backbone(tmp_path / "two_heads.pth", img_size=32, num_heads=2)
    _check_same_function(backbone.model, source, arch)
    with pytest.raises(Exception, match="does not divide the width 96"):
        load_backbone(tmp_path / "two_heads.pth", num_heads=5)
