"""Issue 16 for pretraining: bad images (item 7), torn logs (6), options (8, 18), the
checkpoint/teacher pair and stale temp files (12), and SIGKILL at random points resuming to the
numbers of an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from kill_resume import cli, kill_at_random_points

from moca_eval import outputs
from moca_eval.checkpoint_io import read_checkpoint
from moca_eval.cli import main, one_line
from moca_eval.errors import DatasetError
from moca_eval.pretrain import checkpoint, official
from moca_eval.pretrain.train import run

MICRO_ARGS = ["--config", "tiny", "--img-size", 32, "--num-words", 32, "--num-new-words", 4,
              "--batch-size", 8, "--num-workers", 0, "--no-progress", "--mask-ratios", "0.6",
              "--partial-decoding", "none", "--device", "cpu"]


@pytest.fixture(scope="module")
def images(tmp_path_factory, make_images) -> Path:
    return make_images(tmp_path_factory.mktemp("hostile-pretrain") / "images", 16)


@pytest.fixture
def bad_images(images, tmp_path) -> Path:
    folder = tmp_path / "bad-images"
    shutil.copytree(images, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return folder


@pytest.fixture
def cfg(micro_cfg):
    def make(data: Path, out: Path, **overrides):
        return micro_cfg(data_dir=str(data), output_dir=str(out), **overrides)
    return make


def run_cli(argv: list[object], capsys) -> tuple[int, list[str]]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------- item 7
def test_item07_pretraining_skips_and_records_undecodable_images(bad_images, tmp_path, cfg):
    result = run(cfg(bad_images, tmp_path / "run", epochs=1))
    assert result.skipped == ["broken.jpg"]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["dataset"]["skipped_images"] == ["broken.jpg"]
    assert summary["metrics"]["rows"][0]["steps"] == 2  # 16 decodable images / batch 8


def test_item07_strict_undecodable_image_is_one_line_without_worker_traceback(bad_images, tmp_path, capsys):
    code, err = run_cli(["pretrain", "--data", bad_images, "--output-dir", tmp_path / "run", "--epochs", 1,
                         *MICRO_ARGS, "--num-workers", 1, "--strict"], capsys)
    assert code == 2 and len(err) == 1 and "broken.jpg" in err[0], err
    assert "Traceback" not in err[0] and not (tmp_path / "run" / checkpoint.CHECKPOINT).exists()


def test_item07_worker_error_message_keeps_only_the_original_line():
    worker = DatasetError("Caught DatasetError in DataLoader worker process 0.\nOriginal Traceback (most "
                          "recent call last):\n  File \"x.py\", line 1, in f\nmoca_eval.errors.DatasetError: "
                          "/d/broken.jpg: cannot decode image (corrupt or not an image)\n")
    assert one_line(worker) == "/d/broken.jpg: cannot decode image (corrupt or not an image)"
    assert one_line(DatasetError("a\n  b")) == "a b"


# ----------------------------------------------------------------------------- items 8 and 18
@pytest.mark.parametrize(("extra", "words"), [
    (["--lr", -1], "lr -1.0 must be a positive number"),
    (["--lr", "nan"], "lr nan must be a positive number"),
    (["--blr", 0], "blr 0.0 must be a positive number"),
    (["--num-words", 0], "num_words 0 must be >= 1"),
    (["--num-new-words", 0], "num_new_words 0 must be >= 1"),
    (["--momentum", 2], "momentum 2.0 outside [0, 1]"),  # item 18
    (["--momentum-end", "nan"], "momentum_end nan outside [0, 1]"),
    (["--weight-decay", -0.1], "weight_decay -0.1 must be >= 0"),
    (["--batch-size", 0], "--batch-size must be >= 1"),
    (["--num-workers", -1], "--num-workers must be >= 0"),
    (["--img-size", 0], "--img-size must be >= 1"),
    (["--device", "tpu"], "expected auto, cpu, cuda or cuda:N"),
])
def test_item08_bad_pretraining_options_refused_before_loading(extra, words, tmp_path, capsys):
    code, err = run_cli(["pretrain", "--data", tmp_path / "missing", "--output-dir", tmp_path / "run",
                         *extra], capsys)
    assert code == 2 and len(err) == 1 and words in err[0], err
    assert not (tmp_path / "run").exists()


def test_item03_pretraining_refuses_a_linear_run_dir(images, tmp_path, capsys):
    run_dir = tmp_path / "linear-run"
    run_dir.mkdir()
    (run_dir / outputs.MARKER).write_text(json.dumps({"command": "linear"}))
    (run_dir / "log.jsonl").write_text('{"epoch": 0}\n')
    code, err = run_cli(["pretrain", "--data", images, "--output-dir", run_dir, *MICRO_ARGS], capsys)
    assert code == 2 and len(err) == 1 and "a `moca-eval linear` run directory" in err[0], err
    assert sorted(p.name for p in run_dir.iterdir()) == [outputs.MARKER, "log.jsonl"]


# ----------------------------------------------------------------------------- items 6 and 12
def teacher_of(ckpt_path: Path, cfg_) -> dict[str, torch.Tensor]:
    """The teacher weights inside ``checkpoint-last.pth``, with timm's keys."""
    from moca_eval.pretrain.model import MOCA

    model = MOCA(cfg_)
    raw = read_checkpoint(ckpt_path)["model"]
    model.load_state_dict(official.from_official(raw, expected=model.state_dict().keys(), source="t"))
    return {k.removeprefix("encoder_teacher."): v for k, v in model.state_dict().items()
            if k.startswith("encoder_teacher.")}


def test_item12_teacher_disagreeing_with_the_checkpoint_is_reconciled_on_resume(images, tmp_path, cfg):
    config = cfg(images, tmp_path / "run", epochs=2, save_every=1)
    run(config)
    run_dir = tmp_path / "run"
    # What a kill between the two writes could leave: teacher.pth of another epoch than the checkpoint.
    shutil.copy(run_dir / "checkpoint-0.pth", run_dir / checkpoint.CHECKPOINT)
    stale = run_dir / ".checkpoint-last.pth.k1ll3d.tmp"
    stale.write_bytes(b"\0" * 2048)
    with open(run_dir / "log.jsonl", "a") as handle:
        handle.write('{"epoch": 1, "step": 3, "lo')  # item 6: a torn last line
    result = run(replace(config, resume=True))
    teacher = read_checkpoint(run_dir / checkpoint.TEACHER)["model"]
    expected = teacher_of(run_dir / checkpoint.CHECKPOINT, config)
    assert teacher.keys() == expected.keys() and all(torch.equal(teacher[k], expected[k]) for k in teacher)
    assert not stale.exists() and [h["epoch"] for h in result.history] == [0, 1]


# ----------------------------------------------------------------------------- kill and resume
def test_kill_pretraining_at_random_points_and_resume_matches_an_uninterrupted_run(images, tmp_path):
    epochs = 4
    common = ["pretrain", "--data", images, "--epochs", epochs, *MICRO_ARGS]
    reference = cli([*common, "--output-dir", tmp_path / "reference"], resume=False)
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    ref_log = [json.loads(line) for line in (tmp_path / "reference" / "log.jsonl").open()]
    step_s = 1.5 * sum(1 / r["imgs_per_s"] * 8 for r in ref_log) / len(ref_log)
    run_dir = tmp_path / "killed"
    landed = kill_at_random_points([*common, "--output-dir", run_dir], run_dir, epochs=len(ref_log),
                                   epoch_s=step_s, kills=3, seed=11)
    print("kills landed after", landed, "log lines; reference", len(ref_log))
    assert len(landed) >= 2, landed
    got = [json.loads(line) for line in (run_dir / "log.jsonl").open()]
    timeless = [{k: v for k, v in r.items() if k != "imgs_per_s"} for r in got]
    assert timeless == [{k: v for k, v in r.items() if k != "imgs_per_s"} for r in ref_log]
    for name in (checkpoint.TEACHER, checkpoint.CHECKPOINT):
        a, b = (read_checkpoint(d / name)["model"] for d in (run_dir, tmp_path / "reference"))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert not list(run_dir.glob(".*.tmp"))
