"""``moca-eval pretrain`` end to end on a few random images, and its input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from moca_eval.checkpoints import load_backbone
from moca_eval.cli import main


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pretrain-cli") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_pretrain_tiny_writes_a_loadable_teacher_and_resumes(images, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["pretrain", "--data", str(images), "--config", "tiny", "--epochs", "1", "--output-dir",
            str(out), "--batch-size", "4", "--num-workers", "0", "--no-progress",
            "--mask-ratios", "0.6", "--partial-decoding", "none", "--num-words", "64",
            "--num-new-words", "4"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "loss_loc" in table and "teacher:" in table
    summary = json.loads((out / "summary.json").read_text())
    cfg = summary["config"]
    assert cfg["mask_ratios"] == [0.6] and cfg["partial_decoding"] is None and cfg["num_words"] == 64
    assert cfg["batch_size"] == 4 and cfg["num_new_words"] == 4 and len(summary["metrics"]["rows"]) == 1
    assert cfg["recipe"]["why"].startswith("preset tiny with ") and "num_words" in cfg["recipe"]["why"]
    backbone = load_backbone(out / "teacher.pth", img_size=cfg["img_size"])
    assert backbone.arch.embed_dim == 192 and backbone.pos_embed == "sincos"
    assert main([*args, "--epochs", "2", "--resume"]) == 0  # one more epoch
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 0, 1, 1]


def test_existing_output_without_resume_is_exit_2(images, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(b"")
    code = main(["pretrain", "--data", str(images), "--output-dir", str(out), "--batch-size", "8",
                 "--num-new-words", "8", "--no-progress"])
    assert code == 2
    assert "already holds checkpoint-last.pth; pass --resume" in capsys.readouterr().err


def test_missing_data_dir_is_exit_2(tmp_path, capsys):
    code = main(["pretrain", "--data", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert "nope: no such directory" in capsys.readouterr().err


def test_bad_mask_ratios_are_rejected(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--data", str(tmp_path), "--output-dir", str(tmp_path), "--mask-ratios", "a,b"])
    assert "comma-separated ratios" in capsys.readouterr().err


def test_demo_pretrains_then_compares_teacher_and_random_init_and_reruns_without_training(
        tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert "random init" in table and "MOCA teacher" in table
    result = json.loads((out / "knn.json").read_text())
    teacher, random_init = result["moca_teacher"], result["random_init"]
    assert teacher["checkpoint"]["path"] == str(out / "pretrain" / "teacher.pth")
    assert (teacher["config"]["n_train"], teacher["config"]["n_val"]) == (400, 300)
    assert [(r["k"], r["temperature"]) for r in teacher["metrics"]["rows"]] == [(10, 0.07), (20, 0.07)]
    assert teacher["metrics"]["rows"] != random_init["metrics"]["rows"]
    # the random-init file holds the weights the run started from: epoch 0's first step used them
    start = load_backbone(out / "random-init.pth", img_size=64).model.state_dict()
    trained = load_backbone(out / "pretrain" / "teacher.pth", img_size=64).model.state_dict()
    assert start.keys() == trained.keys() and not torch.equal(start["blocks.0.attn.qkv.weight"],
                                                               trained["blocks.0.attn.qkv.weight"])
    log = (out / "pretrain" / "log.jsonl").read_text()
    assert main(["demo", "--out", str(out), "--epochs", "1", "--no-progress"]) == 0
    assert (out / "pretrain" / "log.jsonl").read_text() == log  # finished run reused
    again = json.loads((out / "knn.json").read_text())["moca_teacher"]
    assert again["metrics"]["rows"] == teacher["metrics"]["rows"]


def test_resume_from_a_missing_checkpoint_file_is_exit_2(images, tmp_path, capsys):
    missing = tmp_path / "official" / "checkpoint-99.pth"
    code = main(["pretrain", "--data", str(images), "--output-dir", str(tmp_path / "run"),
                 "--batch-size", "8", "--num-new-words", "8", "--num-workers", "0", "--no-progress",
                 "--resume", str(missing)])
    assert code == 2
    assert f"{missing}: nothing to resume" in capsys.readouterr().err
