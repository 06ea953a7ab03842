"""The ``moca-eval`` command line end to end on tiny demo data and a tiny random checkpoint."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moca_eval.checkpoint_formats import FORMATS
from moca_eval.checkpoints import load_backbone
from moca_eval.cli import main
from moca_eval.cli.recipes import family_table
from moca_eval.data import eval_transform, load_split
from moca_eval.families import FAMILIES, RECIPES_VERSION
from moca_eval.features import compute_features
from moca_eval.models import ArchSpec
from moca_eval.protocols.knn import evaluate

RUNTIME = ["--img-size", "32", "--device", "cpu", "--num-workers", "0", "--batch-size", "16"]
KS, TEMPERATURES = (5, 10), (0.07, 0.1)


def _knn(ckpt: Path, data: Path, *extra: str) -> list[str]:
    return ["knn", "--ckpt", str(ckpt), "--data", str(data), "--k", *map(str, KS),
            "--temperature", *map(str, TEMPERATURES), *RUNTIME, *extra]


def _extract(ckpt: Path, data: Path, split: str, out: Path, *extra: str) -> list[str]:
    return ["extract", "--ckpt", str(ckpt), "--data", str(data), "--split", split, "--output", str(out),
            *RUNTIME, *extra]


@pytest.fixture(scope="module")
def knn_run(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_demo_data: Path
            ) -> tuple[dict, Path]:
    """One cached ``moca-eval knn`` run: (its JSON, its cache directory)."""
    tmp = tmp_path_factory.mktemp("knn")
    out = tmp / "results" / "knn.json"
    assert main(_knn(tiny_checkpoint, tiny_demo_data, "--cache-dir", str(tmp / "cache"),
                     "--output", str(out))) == 0
    return json.loads(out.read_text()), tmp / "cache"


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, tiny_demo_data: Path
              ) -> dict[str, dict[str, np.ndarray]]:
    """``moca-eval extract --no-cache --feature avg`` of both splits (the independent path)."""
    tmp = tmp_path_factory.mktemp("extract")
    out = {}
    for split in ("train", "val"):
        path = tmp / f"{split}.npz"
        args = _extract(tiny_checkpoint, tiny_demo_data, split, path, "--feature", "avg", "--no-cache")
        assert main(args) == 0
        with np.load(path) as npz:
            out[split] = dict(npz)
    return out


def test_knn_json_has_results_and_provenance(knn_run: tuple[dict, Path], tiny_checkpoint: Path,
                                             tiny_demo_data: Path, tiny_arch: ArchSpec) -> None:
    payload, _ = knn_run
    config = payload["config"]
    assert [payload["protocol"], config["feature"], config["n_train"], config["n_val"]] == [
        "knn", "avg", 60, 30]
    results = payload["metrics"]["rows"]
    assert [(r["k"], r["temperature"]) for r in results] == [(k, t) for k in KS for t in TEMPERATURES]
    for r in results:
        assert set(r) == {"k", "temperature", "top1", "top5"}
        assert 0 <= r["top1"] <= r["top5"] <= 100
        assert r["top1"] * 30 / 100 == pytest.approx(round(r["top1"] * 30 / 100), abs=1e-9)  # k of 30 images
    ckpt = payload["checkpoint"]
    assert ckpt["sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert (ckpt["path"], ckpt["layout"], ckpt["family"], ckpt["family_source"], ckpt["student"]) == (
        str(tiny_checkpoint), "moca-full", "moca", "layout", False)
    assert ckpt["arch_spec"] == dataclasses.asdict(tiny_arch)
    assert (ckpt["pos_embed"], ckpt["dropped_keys"]) == ("sincos", 18)  # the student's 18 tensors
    dataset = payload["dataset"]
    assert (dataset["root"], dataset["splits"], dataset["n_classes"], dataset["skipped_images"]) == (
        str(tiny_demo_data), {"train": 60, "val": 30}, 10, [])
    train, val = load_split(tiny_demo_data, "train"), load_split(tiny_demo_data, "val")
    expected = hashlib.sha256(f"train:{train.manifest_hash()}\nval:{val.manifest_hash()}\n".encode())
    assert dataset["manifest_sha256"] == expected.hexdigest()
    first = results[0]  # no k=20 among KS: the first (k, T) is the headline
    assert payload["metrics"]["headline"] == {"name": f"top1@k={KS[0]},T={TEMPERATURES[0]:g}",
                                              "value": first["top1"], "std": None}
    assert config["recipe"] == {"name": "moca", "why": "family moca", "version": RECIPES_VERSION,
                                "values": {"feature": "avg"}}
    assert payload["config"]["img_size"] == 32 and payload["config"]["precision"] == "fp32"
    assert payload["config"]["ks"] == list(KS) and payload["config"]["temperatures"] == list(TEMPERATURES)
    wall = payload["provenance"]["wall_time_s"]
    assert isinstance(wall, float) and wall >= 0
    packages = payload["provenance"]["packages"]
    assert {name: packages[name] for name in ("torch", "timm", "moca-eval")} == {
        name: metadata.version(name) for name in ("torch", "timm", "moca-eval")}
    assert {"python", "host", "device", "started_utc", "finished_utc", "moca_eval_commit"} <= set(
        payload["provenance"])


def test_knn_top1_equals_evaluate_on_features_from_extract(knn_run: tuple[dict, Path],
                                                           extracted: dict[str, dict]) -> None:
    payload, _ = knn_run
    train, val = extracted["train"], extracted["val"]
    scores = evaluate(train["features"], train["labels"], val["features"], val["labels"], ks=KS,
                      temperatures=TEMPERATURES, num_classes=10, use_gpu=False)
    assert [(r["k"], r["temperature"], r["top1"], r["top5"]) for r in payload["metrics"]["rows"]] == [
        (s.k, s.temperature, s.top1, s.top5) for s in scores]


def test_extract_writes_features_labels_paths_in_dataset_order(
    extracted: dict[str, dict], tiny_checkpoint: Path, tiny_demo_data: Path
) -> None:
    train_index = load_split(tiny_demo_data, "train")
    val_index = load_split(tiny_demo_data, "val", classes=train_index.classes)
    val = extracted["val"]
    assert val["paths"].tolist() == val_index.relpaths()
    assert val["labels"].dtype == np.int64 and val["labels"].tolist() == val_index.labels
    assert val["classes"].tolist() == train_index.classes
    assert val["features"].shape == (30, 32) and val["features"].dtype == np.float32
    assert extracted["train"]["paths"].tolist() == train_index.relpaths()

    model = load_backbone(tiny_checkpoint, img_size=32).model
    transform = eval_transform(32)
    batch = torch.stack([transform(Image.open(path).convert("RGB")) for path, _ in val_index.samples])
    expected = compute_features(model, batch, ["avg"])["avg"].numpy()
    np.testing.assert_allclose(val["features"], expected, atol=1e-5)


def test_second_knn_run_reads_the_cache_without_running_the_backbone(
    knn_run: tuple[dict, Path], tiny_checkpoint: Path, tiny_demo_data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    payload, cache = knn_run
    assert len(list(cache.glob("*.npz"))) == 2  # train and val features of the first run

    def backbone_must_not_run(*args, **kwargs):
        raise AssertionError("backbone ran although the features are cached")

    monkeypatch.setattr("moca_eval.features._run_backbone", backbone_must_not_run)
    out = tmp_path / "again.json"
    assert main(_knn(tiny_checkpoint, tiny_demo_data, "--cache-dir", str(cache), "--output", str(out))) == 0
    assert json.loads(out.read_text())["metrics"] == payload["metrics"]


def test_no_cache_runs_the_backbone_and_leaves_the_cache_alone(
    knn_run: tuple[dict, Path], tiny_checkpoint: Path, tiny_demo_data: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch
) -> None:
    payload, cache = knn_run
    before = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    import moca_eval.features as features

    calls = []
    real = features._run_backbone
    def counting(*args, **kwargs):
        calls.append(args[1].root.name)  # the split folder of the index
        return real(*args, **kwargs)

    monkeypatch.setattr(features, "_run_backbone", counting)
    out = tmp_path / "nocache.json"
    args = _knn(tiny_checkpoint, tiny_demo_data, "--no-cache", "--output", str(out))
    assert main([*args, "--cache-dir", str(cache)]) == 0
    assert main([*args, "--cache-dir", str(tmp_path / "fresh")]) == 0

    assert calls == ["train", "val", "train", "val"]
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == before
    assert not (tmp_path / "fresh").exists()
    assert json.loads(out.read_text())["metrics"] == payload["metrics"]


def test_inspect_without_checkpoint_lists_every_format(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == [fmt.name for fmt in FORMATS]
    assert lines[0].split()[1] == "families=moca"
    assert lines[[fmt.name for fmt in FORMATS].index("model-wrapped")].split()[1] == "families=moca,mae,timm"


def test_inspect_checkpoint_shows_format_hash_and_dropped_keys(tiny_checkpoint: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(tiny_checkpoint)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tiny-moca.pth: format moca-full (teacher/eval weights), family moca, "
                               "vit(d=32,L=1,h=1)/8@32")  # native resolution
    assert lines[1] == f"  sha256   {hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()}"
    assert lines[2] == "  family   moca (layout moca-full is moca's)"
    assert lines[4].startswith("  dropped  encoder.cls_token, encoder.pos_embed, ")
    assert lines[4].endswith(" ...")  # 18 dropped, 6 shown


# --- bad input through the CLI: exit 2, the error as the last stderr line, nothing written ------


def _error_line(err: str) -> str:
    """The one ``moca-eval:`` line; progress bars may precede it, nothing follows it."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert [line for line in lines if line.startswith("moca-eval")] == lines[-1:], err
    assert lines[-1].startswith("moca-eval: error: ")
    return lines[-1].removeprefix("moca-eval: error: ")


def _touch(root: Path, *relpaths: str) -> Path:
    for rel in relpaths:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root


BAD_DATA = {
    "missing-data-dir": (lambda tmp, data: tmp / "nope", r"/nope: no such dataset directory$"),
    "no-val-split": (lambda tmp, data: _touch(tmp / "d", "train/a/1.JPEG"),
                     r"/d: no 'val' split folder \(found: train; expected .*/d/val/<class>/<image>\)$"),
    "no-images": (lambda tmp, data: _touch(tmp / "d", "train/readme.txt", "val/readme.txt"),
                  r"/d/train: no class folders \(expected .*/d/train/<class>/<image>\)$"),
    "empty-class-folder": (lambda tmp, data: _touch(tmp / "d", "train/a/1.JPEG", "train/b/.keep",
                                                    "val/a/1.JPEG"),
                           r"/d/train/b: empty class folder \(no \.jpg/"),
    "val-class-not-in-train": (lambda tmp, data: _touch(tmp / "d", "train/a/1.JPEG", "val/a/1.JPEG",
                                                        "val/zebra/1.JPEG"),
                               r"/d/val: class folder\(s\) not in the training classes: zebra$"),
}


@pytest.mark.parametrize("name", list(BAD_DATA))
def test_knn_bad_dataset_exits_2_with_one_line_and_no_output(
    name: str, tmp_path: Path, tiny_checkpoint: Path, tiny_demo_data: Path, capsys: pytest.CaptureFixture
) -> None:
    build, pattern = BAD_DATA[name]
    out = tmp_path / "out" / "knn.json"
    code = main(_knn(tiny_checkpoint, build(tmp_path, tiny_demo_data), "--cache-dir", str(tmp_path / "c"),
                     "--output", str(out)))
    assert code == 2
    assert re.search(pattern, _error_line(capsys.readouterr().err))
    assert not out.parent.exists()


@pytest.mark.parametrize(("command", "extra", "pattern"), [
    ("knn", ["--feature", "mean"], r"^unknown feature 'mean'; known: cls, avg, cls\+avg, .*cls-lastN\)$"),
    ("extract", ["--feature", "mean"], r"^unknown feature 'mean'; known: cls, avg, "),
    ("knn", ["--k", "61"], r"^k=61 exceeds the 60 training images of .*data$"),
    ("knn", ["--k", "0"], r"^k values must be >= 1 and temperatures > 0$"),
])
def test_bad_option_exits_2_with_one_line_and_no_output(
    command: str, extra: list[str], pattern: str, tmp_path: Path, tiny_checkpoint: Path, tiny_demo_data: Path,
    capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out" / "result"
    base = (_knn(tiny_checkpoint, tiny_demo_data) if command == "knn"
            else _extract(tiny_checkpoint, tiny_demo_data, "val", out))
    code = main([*base, "--cache-dir", str(tmp_path / "c"), "--output", str(out), *extra])
    assert code == 2
    assert re.search(pattern, _error_line(capsys.readouterr().err))
    assert not out.parent.exists()
    assert not list((tmp_path / "c").rglob("*.npz")), "features were extracted before the check"


@pytest.fixture()
def data_with_corrupt_image(tiny_demo_data: Path, tmp_path: Path) -> tuple[Path, str]:
    data = tmp_path / "data"
    shutil.copytree(tiny_demo_data, data)
    bad = "n00000004/n00000004_0002.JPEG"
    (data / "train" / bad).write_bytes(b"\xff\xd8\xff truncated")
    return data, bad


def test_knn_skips_a_corrupt_image_and_records_it(data_with_corrupt_image: tuple[Path, str],
                                                  tiny_checkpoint: Path, tmp_path: Path) -> None:
    data, bad = data_with_corrupt_image
    out = tmp_path / "knn.json"
    assert main(_knn(tiny_checkpoint, data, "--no-cache", "--output", str(out))) == 0
    payload = json.loads(out.read_text())
    assert (payload["config"]["n_train"], payload["config"]["n_val"]) == (59, 30)
    assert payload["dataset"]["skipped_images"] == [bad]


def test_knn_strict_fails_on_a_corrupt_image_naming_it(data_with_corrupt_image: tuple[Path, str],
                                                       tiny_checkpoint: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    data, bad = data_with_corrupt_image
    out = tmp_path / "knn.json"
    assert main(_knn(tiny_checkpoint, data, "--no-cache", "--strict", "--output", str(out))) == 2
    assert _error_line(capsys.readouterr().err) == f"{data / 'train'}: cannot decode 1 image(s): {bad}"
    assert not out.exists()


def test_recipes_lists_every_protocols_named_configs(capsys):
    from moca_eval.protocols.finetune import FINETUNE_RECIPES
    from moca_eval.protocols.linear import LINEAR_RECIPES, linear_recipe
    from moca_eval.protocols.lowshot import LOWSHOT_RECIPES

    assert main(["recipes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    for protocol, registry in (("linear", LINEAR_RECIPES), ("finetune", FINETUNE_RECIPES),
                               ("lowshot", LOWSHOT_RECIPES)):
        names = [r["name"] for r in listed[protocol]]
        assert names == list(registry.names())
        for row in listed[protocol]:
            assert row == json.loads(json.dumps(dataclasses.asdict(registry.get(row["name"]))))
    assert {"moca", "ibot", "dino", "mae"} <= set(LINEAR_RECIPES.names()) & set(FINETUNE_RECIPES.names())
    mae = linear_recipe("mae", epochs=3, blr=None)
    assert (mae.epochs, mae.blr, mae.optimizer, mae.batch_size) == (3, 0.1, "lars", 16384)
    assert main(["recipes", "lowshot"]) == 0
    assert "avg-prenorm" in capsys.readouterr().out
    assert listed["families"] == family_table()
    assert [r["family"] for r in listed["families"]] == FAMILIES.names()
    dino = next(r for r in listed["families"] if r["family"] == "dino")
    assert dino == {"family": "dino", "knn/extract feature": "cls", "linear": "dino", "lowshot": "dino",
                    "finetune": "dino", "seg": "segmenter", "det": "cascade-mask-rcnn"}
