"""``moca-eval det`` end to end on a generated COCO set on CPU: train, evaluate, reuse, resume,
evaluate given weights; bad inputs are one-line errors before mmengine starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("mmdet", reason="the [dense] extra is not installed")
import torch  # noqa: E402

from moca_eval.checkpoints import load_backbone  # noqa: E402
from moca_eval.cli import main  # noqa: E402
from moca_eval.detection import coco  # noqa: E402
from moca_eval.detection.run import DetConfig, run_fingerprint  # noqa: E402
from moca_eval.mm_utils import mmengine_checkpoints  # noqa: E402
from moca_eval.record import validate_record  # noqa: E402
from moca_eval.reporting import settings_of  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny convolutions: ~3x faster on 1 thread

AP_NAMES = ["AP", "AP50", "AP75", "APs", "APm", "APl"]
# A narrow detector for CPU tests: 32 channels instead of 256 (FPN, RPN, RoI heads), 64-unit fc
# layers, fewer proposals and sampled RoIs. The structure (cascade, 4conv1fc, GIoU, mask head)
# is the recipe's.
WIDTH = 32
TINY_DETECTOR = {
    "model.neck.out_channels": WIDTH,
    "model.rpn_head.in_channels": WIDTH,
    "model.rpn_head.feat_channels": WIDTH,
    "model.roi_head.bbox_roi_extractor.out_channels": WIDTH,
    "model.roi_head.mask_roi_extractor.out_channels": WIDTH,
    "model.roi_head.mask_head.in_channels": WIDTH,
    "model.roi_head.mask_head.conv_out_channels": WIDTH,
    "model.train_cfg.rpn_proposal.nms_pre": 200,
    "model.train_cfg.rpn_proposal.max_per_img": 64,
    "model.test_cfg.rpn.nms_pre": 200,
    "model.test_cfg.rpn.max_per_img": 32,
    **{f"model.roi_head.bbox_head.{i}.{k}": v for i in range(3)
       for k, v in (("in_channels", WIDTH), ("conv_out_channels", WIDTH), ("fc_out_channels", 64))},
    **{f"model.train_cfg.rcnn.{i}.sampler.num": 32 for i in range(3)},
}


def det_args(ckpt: Path, data: Path, work: Path, *extra: str) -> list[str]:
    """A 1-epoch CPU run on 64-96 px images: 2 iterations of batch 2."""
    return ["det", "--ckpt", str(ckpt), "--data", str(data), "--work-dir", str(work), "--epochs", "1",
            "--global-batch", "2", "--train-sizes", "64", "96", "--test-size", "96", "--max-size", "160",
            "--warmup-iters", "0", "--num-workers", "0", "--lr", "1e-3", *extra,
            "--cfg-options", *(f"{k}={v}" for k, v in TINY_DETECTOR.items())]


def mm_state(path: Path) -> dict[str, torch.Tensor]:
    with mmengine_checkpoints():
        return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]



def figures(record: dict, task: str) -> dict:
    return record["metrics"]["values"][task]


def check_figures(figures: dict) -> None:
    assert list(figures) == AP_NAMES
    for value in figures.values():
        assert value == -1.0 or 0.0 <= value <= 100.0


def test_train_evaluate_reuse_resume_and_eval_only(det_checkpoint, tiny_coco, tmp_path, capsys):
    work = tmp_path / "run"
    assert main(det_args(det_checkpoint, tiny_coco, work)) == 0
    out = capsys.readouterr().out
    assert "AP box" in out and "APm" in out
    payload = json.loads((work / "results.json").read_text())
    validate_record(payload)
    config = payload["config"]
    assert payload["protocol"] == "det" and config["epochs"] == 1 and not config["eval_only"]
    check_figures(figures(payload, "bbox"))
    check_figures(figures(payload, "segm"))
    assert payload["metrics"]["headline"]["value"] == figures(payload, "bbox")["AP"]
    assert payload["dataset"]["classes"] == list(coco.SYNTHETIC_CLASSES)
    assert payload["dataset"]["splits"]["train"] == 4
    assert payload["checkpoint"]["layout"] == "moca-full" and "packages" in payload["provenance"]
    assert Path(payload["config"]["preview"]).is_file() and (work / "predictions" / "val.bbox.json").is_file()

    weights = work / "epoch_1.pth"
    state = mm_state(weights)
    original = load_backbone(det_checkpoint, img_size=None).model.state_dict()
    for key in ("blocks.0.attn.qkv.weight", "blocks.3.mlp.fc2.weight", "patch_embed.proj.weight"):
        assert not torch.equal(state[f"backbone.vit.{key}"], original[key]), key
    assert state["roi_head.bbox_head.2.fc_cls.weight"].shape[0] == len(coco.SYNTHETIC_CLASSES) + 1

    # the same settings again: the stored figures are reused, nothing is trained
    stamp = (work / "result.json").stat().st_mtime_ns
    assert main(det_args(det_checkpoint, tiny_coco, work)) == 0
    assert (work / "result.json").stat().st_mtime_ns == stamp
    assert figures(json.loads((work / "results.json").read_text()), "bbox") == figures(payload, "bbox")

    # killed after the last checkpoint: --resume picks it up and evaluates the same weights
    (work / "result.json").unlink()
    assert main(det_args(det_checkpoint, tiny_coco, work, "--resume")) == 0
    resumed = json.loads((work / "results.json").read_text())
    assert resumed["metrics"]["values"] == payload["metrics"]["values"]
    assert torch.equal(mm_state(weights)["backbone.vit.blocks.0.attn.qkv.weight"],
                       state["backbone.vit.blocks.0.attn.qkv.weight"])

    # --eval-only on the trained weights, in a fresh directory
    evaluated = tmp_path / "eval"
    assert main(det_args(det_checkpoint, tiny_coco, evaluated, "--eval-only", "--weights", str(weights))) == 0
    only = json.loads((evaluated / "eval_results.json").read_text())
    assert only["config"]["eval_only"] and only["metrics"]["values"] == payload["metrics"]["values"]
    assert not list(evaluated.glob("epoch_*.pth"))


def test_limit_trains_and_evaluates_on_the_first_images(det_checkpoint, tiny_coco, tmp_path):
    work = tmp_path / "limited"
    assert main(det_args(det_checkpoint, tiny_coco, work, "--limit", "0.5")) == 0
    payload = json.loads((work / "results.json").read_text())
    validate_record(payload)
    assert payload["dataset"]["limit"] == 0.5 and payload["dataset"]["splits"] == {"train": 2, "val": 1}
    assert settings_of(payload)["limit"] == 0.5  # what reports mark non-comparable
    kept = {}
    for split, n in (("train", 2), ("val", 1)):
        images = json.loads(coco.ann_file(work / "limited", split).read_text())["images"]
        every = json.loads(coco.ann_file(tiny_coco, split).read_text())["images"]
        kept[split] = [img["id"] for img in images]
        assert kept[split] == sorted(img["id"] for img in every)[:n]
    predicted = {p["image_id"] for p in json.loads((work / "predictions" / "val.bbox.json").read_text())}
    assert predicted <= set(kept["val"])
    check_figures(figures(payload, "bbox"))
    # --eval-only of these weights on the same limited val set: the same figures
    evaluated = tmp_path / "eval"
    weights = str(work / "epoch_1.pth")
    assert main(det_args(det_checkpoint, tiny_coco, evaluated, "--limit", "0.5", "--eval-only", "--weights",
                         weights)) == 0
    assert json.loads((evaluated / "eval_results.json").read_text())["metrics"] == payload["metrics"]
    # an unlimited run never reuses a limited one's figures
    keys = {run_fingerprint(DetConfig(det_checkpoint, tiny_coco, limit=limit), ckpt_sha="c", data_sha="d")
            for limit in (None, 0.5, 1)}
    assert len(keys) == 3


def test_bad_inputs_are_one_line_errors(det_checkpoint, tiny_coco, tmp_path, capsys, monkeypatch):
    def error(*extra: str, data: Path = tiny_coco) -> str:
        code = main(det_args(det_checkpoint, data, tmp_path / "w", *extra))
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        return err

    assert "no such COCO directory" in error(data=tmp_path / "none")
    broken = Path(shutil.copytree(tiny_coco, tmp_path / "broken"))
    coco.ann_file(broken, "train").write_text('{"images": []}')
    assert "instances_train2017.json: not a COCO instances file" in error(data=broken)
    coco.ann_file(broken, "train").write_text(coco.ann_file(tiny_coco, "train").read_text())
    next(coco.image_dir(broken, "val").iterdir()).unlink()
    assert "instances_val2017.json: 1 of 2 images named in it are not in" in error(data=broken)
    assert "--eval-only and --weights" in error("--eval-only")
    assert "no such weights file" in error("--eval-only", "--weights", str(tmp_path / "x.pth"))
    assert "cannot be split" in error("--global-batch", "3")
    assert "--limit 2.5: expected images (1, 2, ...) or a fraction" in error("--limit", "2.5")
    assert "--limit 0: expected images" in error("--limit", "0")
    assert not (tmp_path / "w").exists()  # nothing started
    monkeypatch.setitem(sys.modules, "mmdet", None)  # as if not installed
    assert "run `python -m moca_eval.install_dense` first" in error()


def test_torchrun_two_cpu_processes_train_and_evaluate(det_checkpoint, tiny_coco, tmp_path):
    """mmengine's launcher assumes GPUs; on CPU the run joins a gloo group itself and wraps DDP
    without device ids. Global batch 4 = 2 images x 2 processes, one step."""
    work = tmp_path / "ddp"
    args = det_args(det_checkpoint, tiny_coco, work)
    args[args.index("--global-batch") + 1] = "4"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    proc = subprocess.run([*launcher, "-m", "moca_eval", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    payload = json.loads((work / "results.json").read_text())
    assert payload["config"]["world_size"] == 2
    check_figures(figures(payload, "bbox"))
    check_figures(figures(payload, "segm"))
    state = mm_state(work / "epoch_1.pth")
    original = load_backbone(det_checkpoint, img_size=None).model.state_dict()
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.equal(state[f"backbone.vit.{qkv}"], original[qkv])
