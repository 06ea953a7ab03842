"""Issue 16, interrupted and damaged runs: torn logs, stale temp files, undecodable training images,
and SIGKILL at random points of linear (both modes) and fine-tuning runs that resume to the very
numbers of an uninterrupted run (items 4, 6, 12 and the kill-and-resume tests)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from kill_resume import cli, kill_at_random_points

from moca_eval import runtime
from moca_eval.cli import main
from moca_eval.demo import make_demo_data, save_random_moca_checkpoint
from moca_eval.errors import ConfigError, DatasetError
from moca_eval.features import ExtractConfig
from moca_eval.models import ArchSpec
from moca_eval.pipeline import BackboneConfig, DataConfig, FeatureJob
from moca_eval.protocols import finetune, linear

ARCH = ArchSpec(embed_dim=32, depth=1, num_heads=1, patch_size=8, img_size=32)
BAD_IMAGE = "n00000003/bad.png"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return save_random_moca_checkpoint(tmp_path_factory.mktemp("resume-ckpt") / "tiny.pth", arch=ARCH)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """10 classes x 12 train / 3 val images, 32 px."""
    return make_demo_data(tmp_path_factory.mktemp("resume") / "data", train_per_class=12, val_per_class=3,
                          image_size=32)


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory) -> Path:
    """10 classes x 6 train / 2 val images plus one undecodable training image."""
    root = make_demo_data(tmp_path_factory.mktemp("bad") / "data", train_per_class=6, val_per_class=2,
                          image_size=32)
    (root / "train" / BAD_IMAGE).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    return root


def job(ckpt: Path, data: Path, tmp_path: Path, *, strict: bool = False) -> FeatureJob:
    return FeatureJob(BackboneConfig(ckpt, img_size=32), DataConfig(data),
                      ExtractConfig(batch_size=32, num_workers=0, device="cpu",
                                    cache_dir=tmp_path / "cache", strict=strict))


# ----------------------------------------------------------------------------- item 6
def test_item06_torn_last_log_line_is_dropped_with_a_warning(tmp_path, caplog):
    path = tmp_path / "log.jsonl"
    path.write_text('{"epoch": 0, "loss": 2.0}\n{"epoch": 1, "loss": 1.5}\n{"epoch": 2, "lo')
    log = runtime.JsonlLog(path)
    with caplog.at_level(logging.WARNING):
        assert log.records() == [{"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.5}]
    assert "torn last line" in caplog.text
    log.truncate(1)
    log.write({"epoch": 1, "loss": 1.25})
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"epoch": 0, "loss": 2.0}, {"epoch": 1, "loss": 1.25}]


def test_item06_damage_before_the_last_line_is_one_line_error(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"epoch": 0}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(ConfigError, match="line 2 is not JSON"):
        runtime.JsonlLog(path).records()


# ----------------------------------------------------------------------------- item 12
def test_item12_stale_temp_files_of_the_run_are_removed_on_resume(ckpt, data, tmp_path):
    recipe = linear.linear_recipe("moca", epochs=2, batch_size=16, features=("avg",), lr_grid=(0.1,))
    cfg = linear.LinearConfig(job(ckpt, data, tmp_path), recipe, mode="cached", output_dir=tmp_path / "run")
    linear.run(cfg)
    stale = tmp_path / "run" / ".checkpoint.pth.x1y2z3.tmp"
    stale.write_bytes(b"\0" * 4096)  # what a SIGKILL inside torch.save leaves behind
    linear.run(linear.LinearConfig(**{**cfg.__dict__, "resume": True}))
    assert not stale.exists() and (tmp_path / "run" / runtime.CHECKPOINT_NAME).exists()


# ----------------------------------------------------------------------------- item 4
def test_item04_linear_augmented_counts_undecodable_training_images(ckpt, bad_data, tmp_path):
    recipe = linear.linear_recipe("moca", epochs=1, batch_size=16, features=("avg",), lr_grid=(0.1,))
    result = linear.run(linear.LinearConfig(job(ckpt, bad_data, tmp_path), recipe, mode="augmented",
                                            micro_batch=16, output_dir=tmp_path / "run"))
    config, dataset = result.record.config, result.record.dataset
    assert BAD_IMAGE in dataset["skipped_images"]
    assert config["n_train"] + config["n_holdout"] == 60  # 61 files, one undecodable
    with pytest.raises(DatasetError, match=f"cannot decode 1 image.*{BAD_IMAGE}"):
        linear.run(linear.LinearConfig(job(ckpt, bad_data, tmp_path, strict=True), recipe, mode="augmented",
                                       micro_batch=16))


def test_item04_linear_cached_records_undecodable_training_images(ckpt, bad_data, tmp_path):
    recipe = linear.linear_recipe("moca", epochs=1, batch_size=16, features=("avg",), lr_grid=(0.1,))
    result = linear.run(linear.LinearConfig(job(ckpt, bad_data, tmp_path), recipe, mode="cached"))
    assert BAD_IMAGE in result.record.dataset["skipped_images"]
    assert result.record.config["n_train"] + result.record.config["n_holdout"] == 60


def test_item04_finetune_counts_undecodable_training_images(ckpt, bad_data, tmp_path):
    recipe = finetune.finetune_recipe("moca", epochs=1, batch_size=16, warmup_epochs=0)
    result = finetune.run(finetune.FinetuneConfig(job(ckpt, bad_data, tmp_path), recipe))
    assert result.n_train == 60 and result.record.config["n_train"] == 60
    assert BAD_IMAGE in result.record.dataset["skipped_images"]
    with pytest.raises(DatasetError, match=f"cannot decode 1 image.*{BAD_IMAGE}"):
        finetune.run(finetune.FinetuneConfig(job(ckpt, bad_data, tmp_path, strict=True), recipe))


@pytest.mark.parametrize("argv", [["linear", "--mode", "augmented", "--single-head", "--features", "avg"],
                                  ["finetune"]], ids=["linear", "finetune"])
def test_item04_strict_undecodable_training_image_is_one_line(argv, ckpt, bad_data, tmp_path, capsys):
    capsys.readouterr()
    code = main([*argv, "--ckpt", str(ckpt), "--data", str(bad_data), "--img-size", "32", "--epochs", "1",
                 "--global-batch", "16", "--batch-size", "16", "--device", "cpu", "--num-workers", "0",
                 "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "run"), "--strict"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and BAD_IMAGE in err[0], err


# ----------------------------------------------------------------------------- kill and resume
def assert_same_result(run: Path, reference: Path, epochs: int) -> None:
    got, want = (json.loads((d / "results.json").read_text()) for d in (run, reference))
    assert got["metrics"] == want["metrics"]
    assert [json.loads(line)["epoch"] for line in (run / runtime.LOG_NAME).read_text().splitlines()] \
        == list(range(epochs))
    assert not list(run.glob(".*.tmp")) and not list(run.glob("*.tmp"))


KILL_CASES = {
    "linear-augmented": (["linear", "--mode", "augmented", "--lrs", "0.1", "1", "--features", "avg", "cls",
                          "--global-batch", "24", "--batch-size", "12"], 6),
    "linear-cached": (["linear", "--mode", "cached", "--lrs", "0.1", "1", "--features", "avg",
                       "--global-batch", "24"], 12),
    "finetune": (["finetune", "--global-batch", "24", "--batch-size", "12", "--warmup-epochs", "1"], 5),
}


@pytest.mark.parametrize("case", KILL_CASES)
def test_kill_at_random_points_and_resume_matches_an_uninterrupted_run(case, ckpt, data, tmp_path):
    args, epochs = KILL_CASES[case]
    common = [*args, "--ckpt", ckpt, "--data", data, "--img-size", 32, "--epochs", epochs, "--device", "cpu",
              "--num-workers", 0, "--cache-dir", tmp_path / "cache"]
    reference = cli([*common, "--output-dir", tmp_path / "reference"], resume=False)
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err[-3000:]
    times = [json.loads(line)["time_s"] for line in (tmp_path / "reference" / runtime.LOG_NAME).open()]
    run = tmp_path / "killed"
    landed = kill_at_random_points([*common, "--output-dir", run], run, epochs=epochs, kills=3,
                                   epoch_s=1.5 * sum(times) / len(times), seed=sum(map(ord, case)))
    print("kills landed after", landed, "epochs logged")
    assert len(landed) >= 2, landed
    assert_same_result(run, tmp_path / "reference", epochs)
