"""End-to-end training on a micro config: files, checkpoint layout, loaders, exact resume."""

import argparse
import hashlib
import json
import shutil
from dataclasses import replace

import pytest
import torch

from moca_eval.checkpoint_io import read_checkpoint
from moca_eval.checkpoints import load_backbone
from moca_eval.errors import ConfigError
from moca_eval.pretrain import run
from moca_eval.pretrain.model import MOCA
from moca_eval.pretrain.official import from_official
from moca_eval.record import validate_record

STEP_KEYS = {"epoch", "step", "loss", "loss_img", "loss_loc", "tau", "codebook_usage", "lr",
             "momentum", "imgs_per_s"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, micro_cfg, make_images):
    """Three epochs (two steps each) with a numbered checkpoint after every epoch."""
    root = tmp_path_factory.mktemp("pretrain")
    data = make_images(root / "images", 16)
    cfg = micro_cfg(data_dir=str(data), output_dir=str(root / "run"), epochs=3, save_every=1)
    return cfg, run(cfg)


def test_run_writes_moca_layout_checkpoint_teacher_log_and_summary(trained):
    cfg, result = trained
    ckpt = read_checkpoint(result.checkpoint)
    assert set(ckpt) == {"model", "optimizer", "epoch", "args"}  # fp32: no scaler, as MOCA's --no_fp16
    assert ckpt["epoch"] == 2 and isinstance(ckpt["args"], argparse.Namespace)
    assert ckpt["args"].model == "moca_vit_tiny_patch8_dec32d1b" and ckpt["args"].input_size == 32
    groups = ckpt["optimizer"]["param_groups"]
    assert [(g["is_wgen"], g["use_wd"], g["weight_decay"]) for g in groups] == [
        (False, False, 0.0), (False, True, 0.05), (True, False, 0.0), (True, True, 0.05)]
    with pytest.raises(Exception, match="Namespace"):  # needs the allow-list, as MOCA's own files
        torch.load(result.checkpoint, weights_only=True)
    teacher = torch.load(result.teacher, weights_only=True)
    assert set(teacher) == {"model"}
    assert teacher["model"].keys() == {k.removeprefix("encoder_teacher.") for k in ckpt["model"]
                                       if k.startswith("encoder_teacher.")}
    records = [json.loads(line) for line in result.log_file.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(6)) and set(records[0]) == STEP_KEYS
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    summary = json.loads((result.output_dir / "summary.json").read_text())
    validate_record(summary)
    assert summary == result.to_dict() and summary["protocol"] == "pretrain"
    assert summary["config"]["epochs"] == 3 and summary["metrics"]["values"]["epochs_done"] == 3
    assert [row["epoch"] for row in summary["metrics"]["rows"]] == [0, 1, 2]
    assert summary["metrics"]["headline"]["value"] == pytest.approx(result.history[-1]["loss"])
    assert summary["checkpoint"]["sha256"] == hashlib.sha256(result.teacher.read_bytes()).hexdigest()
    assert summary["checkpoint"]["family"] == "moca" and summary["checkpoint"]["family_source"] == "trained"
    assert summary["dataset"]["splits"] == {"train": 16} and summary["config"]["recipe"]["name"] == "tiny"
    seconds = sum(cfg.batch_size / r["imgs_per_s"] for r in records)  # each step: batch / duration
    assert summary["metrics"]["values"]["train_time_s"] == pytest.approx(seconds, abs=1e-3)
    assert (result.output_dir / "checkpoint-0.pth").is_file()


def test_checkpoints_load_strictly_with_the_core_loader(trained):
    cfg, result = trained
    model = MOCA(cfg)
    model.load_state_dict(from_official(read_checkpoint(result.checkpoint)["model"],
                                        expected=model.state_dict().keys(), source="test"))
    images = torch.randn(2, 3, 32, 32)
    expected = model.encoder_teacher.eval().forward_features(images)
    full = load_backbone(result.checkpoint, img_size=32)
    assert full.format == "moca-full" and full.pos_embed == "sincos"
    assert full.arch.depth == 2 and full.arch.embed_dim == 192 and full.arch.num_heads == 3
    assert torch.allclose(full.model.forward_features(images), expected, atol=1e-5)
    extracted = load_backbone(result.teacher, img_size=32)
    assert torch.allclose(extracted.model.forward_features(images), expected, atol=1e-5)
    student = load_backbone(result.checkpoint, img_size=32, student=True)
    assert torch.allclose(student.model.forward_features(images),
                          model.encoder.eval().forward_features(images), atol=1e-5)


def test_resume_continues_exactly_like_an_uninterrupted_run(trained, tmp_path):
    cfg, result = trained
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(result.output_dir / "checkpoint-0.pth", resumed_dir / "checkpoint-last.pth")
    resumed = run(replace(cfg, output_dir=str(resumed_dir), resume=True, save_every=0))
    full = [json.loads(line) for line in result.log_file.read_text().splitlines()]
    again = [json.loads(line) for line in resumed.log_file.read_text().splitlines()]
    keys = ("step", "loss", "loss_img", "loss_loc", "tau", "codebook_usage", "lr")
    assert [[r[k] for k in keys] for r in again] == [[r[k] for k in keys] for r in full[2:]]
    a, b = read_checkpoint(result.checkpoint)["model"], read_checkpoint(resumed.checkpoint)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_run_needs_resume_and_the_same_settings(trained):
    cfg, result = trained
    with pytest.raises(ConfigError, match="pass --resume"):
        run(cfg)
    with pytest.raises(ConfigError, match="cannot resume with different settings: lr"):
        run(replace(cfg, resume=True, lr=5e-4))


def test_resume_without_checkpoint_is_an_error(micro_cfg, image_dir, tmp_path):
    cfg = micro_cfg(data_dir=str(image_dir), output_dir=str(tmp_path / "new"), resume=True)
    with pytest.raises(ConfigError, match="nothing to resume"):
        run(cfg)
