"""Segmenter on mmseg end to end on a generated Cityscapes tree: both modes, metrics, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mmseg", reason="the [dense] extra is not installed")
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from moca_eval.checkpoints import load_backbone  # noqa: E402
from moca_eval.cli import main  # noqa: E402
from moca_eval.errors import DatasetError  # noqa: E402
from moca_eval.features import compute_features  # noqa: E402
from moca_eval.mm_utils import mmengine_checkpoints  # noqa: E402
from moca_eval.pipeline import DataConfig  # noqa: E402
from moca_eval.record import validate_record  # noqa: E402
from moca_eval.reporting import settings_of  # noqa: E402
from moca_eval.segmentation import cityscapes as cs  # noqa: E402
from moca_eval.segmentation.mm_modules import MocaEvalViT  # noqa: E402
from moca_eval.segmentation.run import SegConfig, run, split_fingerprint  # noqa: E402
from moca_eval.suite import PROTOCOLS, build_config  # noqa: E402

CROP = 64


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory) -> Path:
    return cs.make_synthetic_cityscapes(tmp_path_factory.mktemp("cs") / "cityscapes", n_train=6, n_val=2,
                                        size=(128, 256))


def small(cfg_ckpt: Path, data: Path, work_dir: Path, **overrides) -> SegConfig:
    base = dict(backbone=cfg_ckpt, data=data, train_size="full", iters=3, batch_size=2, crop_size=CROP,
                stride=48, resize_scale=(256, 128), num_workers=0, work_dir=work_dir)
    return SegConfig(**{**base, **overrides})


def confusion_miou(pred_dir: Path, data: Path, count: int | None = None) -> tuple[float, np.ndarray]:
    """mIoU (%) and per-class IoU from the saved predictions and the label files, with numpy
    (``count``: of the first val images only)."""
    conf = np.zeros((19, 19), dtype=np.int64)
    pairs = cs.list_pairs(data, "val")[:count]
    for _, label_path in pairs:
        stem = label_path.name.removesuffix(cs.TRAIN_IDS_SUFFIX)
        pred = np.array(Image.open(pred_dir / f"{stem}_leftImg8bit.png")).astype(np.int64)
        gt = np.array(Image.open(label_path)).astype(np.int64)
        keep = gt != cs.IGNORE_INDEX
        conf += np.bincount(gt[keep] * 19 + pred[keep], minlength=19 * 19).reshape(19, 19)
    inter = np.diag(conf).astype(float)
    union = conf.sum(0) + conf.sum(1) - inter
    with np.errstate(invalid="ignore"):
        iou = inter / union
    return float(np.nanmean(iou) * 100), iou * 100


def mm_state(work_dir: Path) -> dict[str, torch.Tensor]:
    last = (work_dir / "last_checkpoint").read_text().strip()
    with mmengine_checkpoints():
        return torch.load(last, map_location="cpu", weights_only=True)["state_dict"]


def test_wrapper_gives_the_feature_extractor_patch_tokens(tiny_checkpoint):
    wrapper = MocaEvalViT(str(tiny_checkpoint), img_size=CROP).eval()
    reference = load_backbone(tiny_checkpoint, img_size=CROP).model
    x = torch.randn(2, 3, CROP, CROP)
    with torch.no_grad():
        (fmap,) = wrapper(x)
        tokens = reference.forward_features(x)[:, reference.num_prefix_tokens:]
        avg = compute_features(reference, x, ["avg"])["avg"]
    assert fmap.shape == (2, 32, CROP // 8, CROP // 8)
    assert torch.allclose(fmap.flatten(2).transpose(1, 2), tokens, atol=1e-6)
    assert torch.allclose(fmap.mean((2, 3)), avg, atol=1e-6)
    with torch.no_grad():  # other sizes (sliding-window borders): resampled table, padded input
        assert wrapper(torch.randn(1, 3, 40, 70))[0].shape == (1, 32, 5, 9)


def test_linear_probe_keeps_the_backbone_and_reports_the_confusion_matrix_miou(
        tiny_checkpoint, cityscapes, tmp_path, capsys):
    work = tmp_path / "lin"
    args = ["seg", "--ckpt", str(tiny_checkpoint), "--data", str(cityscapes), "--train-size", "full",
            "--iters", "3", "--batch-size", "2", "--crop-size", str(CROP), "--stride", "48",
            "--num-workers", "0", "--work-dir", str(work), "--save-predictions", "--lr", "0.05",
            "--resize-scale", "256", "128"]
    cfg = small(tiny_checkpoint, cityscapes, work, save_predictions=True, lr=0.05)
    result = run(cfg).to_dict()
    split = result["metrics"]["rows"][0]
    assert split["split"] == "full" and split["n_train"] == 6 and split["iters"] == 3
    miou, per_class = confusion_miou(work / "linear-full" / "predictions", cityscapes)
    assert split["miou"] == pytest.approx(miou, abs=0.006)  # mmseg rounds to 2 decimals
    got = np.array([split["per_class_iou"][name] for name in cs.CLASSES])
    assert np.allclose(got, per_class, equal_nan=True, atol=1e-4)
    state = mm_state(work / "linear-full")
    original = load_backbone(tiny_checkpoint, img_size=CROP).model.state_dict()
    for key, value in original.items():
        assert torch.equal(state[f"backbone.vit.{key}"], value), key
    assert state["decode_head.conv_seg.weight"].shape == (19, 32, 1, 1)
    names = cs.read_names(work / "linear-full" / "train_split.txt")
    assert names == cs.train_names(cityscapes)
    # the CLI with the same settings: the stored split is reused, not trained again
    stamp = (work / "linear-full" / "result.json").stat().st_mtime_ns
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "mIoU" in out and (work / "results.json").is_file() and (work / "results.png").is_file()
    payload = json.loads((work / "results.json").read_text())
    assert payload["metrics"]["rows"][0]["miou"] == split["miou"]
    assert payload["checkpoint"]["layout"] == "moca-full"
    validate_record(payload)
    assert payload["metrics"]["headline"]["value"] == split["miou"] and payload["protocol"] == "seg"
    assert (work / "linear-full" / "result.json").stat().st_mtime_ns == stamp


def test_limit_trains_and_evaluates_on_the_first_images_only(tiny_checkpoint, cityscapes, tmp_path, capsys):
    work = tmp_path / "limited"
    result = run(small(tiny_checkpoint, cityscapes, work, save_predictions=True, limit=0.5)).to_dict()
    split_dir = work / "linear-full"
    val_stems = [cs.image_stem(image) for image, _ in cs.list_pairs(cityscapes, "val")]
    assert cs.read_names(split_dir / "train_split.txt") == cs.train_names(cityscapes)[:3]  # 0.5 of 6
    assert cs.read_names(split_dir / "val_split.txt") == val_stems[:1]  # 0.5 of 2
    predicted = sorted(p.name for p in (split_dir / "predictions").rglob("*.png"))
    assert predicted == [f"{val_stems[0].split('/')[1]}_leftImg8bit.png"]
    row = result["metrics"]["rows"][0]
    assert row["n_train"] == 3 and row["iters"] == 3
    miou, _ = confusion_miou(split_dir / "predictions", cityscapes, count=1)
    assert row["miou"] == pytest.approx(miou, abs=0.006)  # mmseg rounds to 2 decimals
    assert result["dataset"]["limit"] == 0.5 and result["dataset"]["splits"]["val"] == 1
    assert settings_of(result)["limit"] == 0.5  # what reports mark non-comparable
    validate_record(result)
    # the same training images, unlimited: another fingerprint (the val set differs), never reused
    keys = {split_fingerprint(small(tiny_checkpoint, cityscapes, work, limit=limit), names_digest="d",
                              iters=3, ckpt_sha="c") for limit in (None, 0.5, 3)}
    assert len(keys) == 3
    for bad in ("0", "1.5", "-2"):
        code = main(["seg", "--ckpt", str(tiny_checkpoint), "--data", str(cityscapes), "--limit", bad,
                     "--work-dir", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and f"--limit {float(bad):g}: expected images" in err, err
    assert not (tmp_path / "bad").exists()


def test_a_suites_limit_reaches_its_seg_cells(tiny_checkpoint, cityscapes, tmp_path):
    spec = PROTOCOLS["seg"]
    data = DataConfig(tmp_path, limit=2)
    cfg = build_config(spec, {"data": cityscapes}, backbone=tiny_checkpoint, data=data, extract=None,
                       run_dir=tmp_path)
    assert cfg.limit == 2 and cfg.work_dir == tmp_path / "work"
    own = build_config(spec, {"data": cityscapes, "limit": 0.25}, backbone=tiny_checkpoint, data=data,
                       extract=None, run_dir=tmp_path)
    assert own.limit == 0.25
    unlimited = build_config(spec, {"data": cityscapes}, backbone=tiny_checkpoint, data=DataConfig(tmp_path),
                             extract=None, run_dir=tmp_path)
    assert unlimited.limit is None


def test_the_apis_limit_reaches_seg(tiny_checkpoint, cityscapes, tmp_path, monkeypatch):
    import moca_eval
    from moca_eval import suite

    class Built(Exception):
        pass

    def capture(spec, cfg, source):
        raise Built(cfg)

    monkeypatch.setattr(suite, "run_protocol", capture)
    with pytest.raises(Built) as built:
        moca_eval.evaluate(tiny_checkpoint, "seg", cityscapes, limit=3, output_dir=tmp_path)
    assert built.value.args[0].limit == 3 and built.value.args[0].data == cityscapes


def test_finetune_updates_the_backbone_and_resumes_from_mmengine_checkpoints(
        tiny_checkpoint, cityscapes, tmp_path):
    work = tmp_path / "ft"
    cfg = small(tiny_checkpoint, cityscapes, work, mode="finetune", iters=2, save_every=1,
                names_file=None, train_size="full", layer_decay=0.75)
    first = run(cfg).splits[0]
    state = mm_state(work / "finetune-full")
    original = load_backbone(tiny_checkpoint, img_size=CROP).model.state_dict()
    qkv = "blocks.0.attn.qkv.weight"
    assert not torch.equal(state[f"backbone.vit.{qkv}"], original[qkv])
    assert "decode_head.cls_emb" in state and state["decode_head.cls_emb"].shape == (1, 19, 32)
    (work / "finetune-full" / "result.json").unlink()  # as if killed after the last checkpoint
    last = Path((work / "finetune-full" / "last_checkpoint").read_text().strip())
    stamp = last.stat().st_mtime_ns
    again = run(SegConfig(**{**cfg.__dict__, "resume": True})).splits[0]
    assert last.name == "iter_2.pth" and last.stat().st_mtime_ns == stamp  # loaded, not retrained
    assert again.miou == first.miou
    values = [list(score.per_class_iou.values()) for score in (again, first)]
    assert np.array_equal(*values, equal_nan=True)


def test_split_command_prints_the_french_split(cityscapes, capsys):
    assert main(["seg", "split", "--data", str(cityscapes), "--size", "3", "--split-seed", "23456"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == cs.french_split(cs.train_names(cityscapes), 3, 23456)


def test_bad_inputs_are_one_line_errors(tiny_checkpoint, cityscapes, tmp_path, capsys):
    names = tmp_path / "names.txt"
    names.write_text("aachen/aachen_999999_000019\n")
    code = main(["seg", "--ckpt", str(tiny_checkpoint), "--data", str(cityscapes), "--names", str(names),
                 "--work-dir", str(tmp_path / "w")])
    assert code == 2 and "names.txt: 1 name(s) not in the dataset" in capsys.readouterr().err
    code = main(["seg", "--ckpt", str(tiny_checkpoint), "--data", str(tmp_path / "none")])
    assert code == 2 and "none" in capsys.readouterr().err
    code = main(["seg", "--ckpt", str(tiny_checkpoint), "--data", str(cityscapes), "--mode", "linear",
                 "--layer-decay", "0.65"])
    assert code == 2 and "fine-tuning only" in capsys.readouterr().err


def test_two_processes_through_mmengines_launcher(tiny_checkpoint, cityscapes, tmp_path):
    """torchrun with 2 gloo processes: mmengine's 'pytorch' launcher, val sharded and gathered."""
    work = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "moca_eval", "seg", "--ckpt", str(tiny_checkpoint), "--data", str(cityscapes), "--train-size",
           "full", "--iters", "2", "--batch-size", "2", "--crop-size", str(CROP), "--stride", "48",
           "--resize-scale", "256", "128", "--num-workers", "0", "--work-dir", str(work),
           "--save-predictions"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((work / "results.json").read_text())
    assert result["config"]["batch_size"] == 2 and done.stdout.count("per-class IoU chart") == 1
    miou, _ = confusion_miou(work / "linear-full" / "predictions", cityscapes)
    assert result["metrics"]["rows"][0]["miou"] == pytest.approx(miou, abs=0.006)  # both val shards counted


def test_prepare_command_writes_the_missing_train_id_maps(tmp_path, capsys):
    root = cs.make_synthetic_cityscapes(tmp_path / "cs", n_train=2, n_val=1, size=(32, 64), train_ids=False)
    with pytest.raises(DatasetError, match="seg prepare"):
        cs.list_pairs(root, "train")
    assert main(["seg", "prepare", "--data", str(root)]) == 0
    assert "wrote 3 " in capsys.readouterr().out
    for _, label in cs.list_pairs(root, "train") + cs.list_pairs(root, "val"):
        ids = np.array(Image.open(str(label).replace(cs.TRAIN_IDS_SUFFIX, cs.LABEL_IDS_SUFFIX)))
        assert np.array_equal(np.array(Image.open(label)), cs.to_train_ids(ids))


def test_a_corrupt_image_is_a_one_line_error_naming_it(tiny_checkpoint, cityscapes, tmp_path, capsys):
    root = Path(shutil.copytree(cityscapes, tmp_path / "cs"))
    bad = sorted((root / "leftImg8bit" / "val").rglob("*.png"))[0]
    bad.write_bytes(b"not a png")
    code = main(["seg", "--ckpt", str(tiny_checkpoint), "--data", str(root), "--train-size", "full",
                 "--iters", "1", "--batch-size", "2", "--crop-size", str(CROP), "--num-workers", "1",
                 "--resize-scale", "256", "128", "--work-dir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and err.startswith(f"moca-eval: error: {bad}: cannot decode image"), err
