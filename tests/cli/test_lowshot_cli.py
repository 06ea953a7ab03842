"""End to end: demo data + a random tiny ViT through `moca-eval lowshot`, `splits`, `plot`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from moca_eval.checkpoints import load_backbone
from moca_eval.cli import main
from moca_eval.data import eval_transform, load_split
from moca_eval.demo import make_demo_data
from moca_eval.features import ExtractConfig, extract_features
from moca_eval.models import ArchSpec, build_vit
from moca_eval.protocols.splits import DatasetKeys, Setting, make_split_files

ARCH = ArchSpec(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lowshot")
    data = make_demo_data(root / "data", seed=0, train_per_class=8, val_per_class=5,
                          image_size=32)
    torch.manual_seed(0)
    ckpt = root / "vit.pth"
    torch.save({"model": build_vit(ARCH).state_dict()}, ckpt)
    return {"root": root, "data": data, "ckpt": ckpt, "cache": root / "cache"}


def lowshot(env, out: Path, *extra: str, data: Path | None = None) -> int:
    argv = ["lowshot", "--ckpt", str(env["ckpt"]), "--data", str(data or env["data"]),
            "--img-size", "32", "--device", "cpu", "--num-workers", "0",
            "--cache-dir", str(env["cache"]), "--output", str(out), *extra]
    return main(argv)


def test_lowshot_matches_sklearn_on_the_same_features(env):
    out = env["root"] / "gen" / "ls.json"
    assert lowshot(env, out, "--percent", "25", "--tol", "1e-9") == 0
    res = json.loads(out.read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["protocol"] == "lowshot" and res["config"]["feature"] == "avg-prenorm"
    assert len(res["metrics"]["rows"]) == 12 and res["config"]["interpolation"] == "bilinear"
    # independent recomputation: the same splits, features of the same backbone, sklearn
    index = load_split(env["data"], "train")
    val_index = load_split(env["data"], "val", classes=index.classes)
    files = make_split_files(DatasetKeys.from_index(index),
                             [Setting(shots=s) for s in (1, 2, 5)] + [Setting(percent=25)], 3,
                             seed=0)
    backbone = load_backbone(env["ckpt"], img_size=32)
    tf = eval_transform(32, interpolation="bilinear")
    cfg = ExtractConfig(num_workers=0, device="cpu")
    tr = extract_features(backbone, index, ["avg-prenorm"], cfg, transform=tf)
    va = extract_features(backbone, val_index, ["avg-prenorm"], cfg, transform=tf)

    def prep(x):
        x = x.astype(np.float64) - x.mean(1, keepdims=True)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    xt, xv = prep(tr.features["avg-prenorm"]), prep(va.features["avg-prenorm"])
    row = {p: i for i, p in enumerate(tr.paths)}
    by_file = {r["file"]: r for r in res["metrics"]["rows"]}
    for sf in files:
        got = by_file[sf.relpath]
        assert got["sha256"] == sf.sha256 == res["config"]["splits"]["files"][sf.relpath]["sha256"]
        idx = [row[k] for k in sf.keys]
        clf = LogisticRegression(C=1 / 0.1, fit_intercept=False, tol=1e-10, max_iter=10000)
        ref = 100 * np.mean(clf.fit(xt[idx], tr.labels[idx]).predict(xv) == va.labels)
        assert got["n_train"] == len(idx)
        assert abs(got["top1"] - ref) <= 0.2
    for s in res["metrics"]["splits"]:
        top1 = [r["top1"] for r in sorted(res["metrics"]["rows"], key=lambda r: r["split"])
                if r.get("shots") == s.get("shots") and r.get("percent") == s.get("percent")]
        assert s["values"] == pytest.approx(top1, abs=1e-3)
        assert s["mean"] == pytest.approx(np.mean(top1), abs=1e-3)
        assert s["std"] == pytest.approx(np.std(top1), abs=1e-3)
    assert [s.get("shots") for s in res["metrics"]["splits"]] == [1, 2, 5, None]
    head = res["metrics"]["splits"][0]
    assert res["metrics"]["headline"] == {"name": "top1 1-shot (mean over splits)", "value": head["mean"],
                                          "std": head["std"]}


def test_split_dir_from_splits_make_gives_the_same_run(env, capsys):
    split_dir = env["root"] / "made"
    assert main(["splits", "make", "--data", str(env["data"]), "--out", str(split_dir),
                 "--seed", "0", "--percent"]) == 0
    assert main(["splits", "verify", str(split_dir), "--data", str(env["data"])]) == 0
    assert main(["splits", "stats", str(split_dir)]) == 0
    stats = capsys.readouterr().out
    assert "images shared between splits" in stats and "imagenet_subsets3/5imgs_class.txt" in stats
    gen, made = env["root"] / "a.json", env["root"] / "b.json"
    assert lowshot(env, gen) == 0
    assert lowshot(env, made, "--split-dir", str(split_dir)) == 0
    whole = env["root"] / "c.json"  # features of the whole train set, rows picked by name
    assert lowshot(env, whole, "--split-dir", str(split_dir), "--train-features", "all") == 0
    a, b, c = (json.loads(p.read_text()) for p in (gen, made, whole))
    assert a["metrics"]["rows"] == b["metrics"]["rows"] == c["metrics"]["rows"]
    assert b["config"]["splits"]["source"] == "dir"
    manifest = json.loads((split_dir / "manifest.json").read_text())
    for rel, entry in b["config"]["splits"]["files"].items():
        assert entry["sha256"] == manifest["files"][rel]["sha256"]
    (split_dir / "imagenet_subsets1/1imgs_class.txt").write_text("n00000001_0000.JPEG\n")
    assert main(["splits", "verify", str(split_dir)]) == 2


def broken_split_dir(env, name: str) -> Path:
    src = env["root"] / f"src-{name}"
    assert main(["splits", "make", "--data", str(env["data"]), "--out", str(src),
                 "--percent"]) == 0
    (src / "manifest.json").unlink()
    return src


@pytest.mark.parametrize("case", ["missing", "empty", "short"])
def test_bad_split_input_exits_2_and_writes_nothing(env, capsys, case):
    data, extra = env["data"], []
    if case == "short":
        data = env["root"] / "short-data"
        if not data.exists():
            shutil.copytree(env["data"], data)
            for p in sorted((data / "train" / "n00000003").iterdir())[3:]:
                p.unlink()
    else:
        split_dir = broken_split_dir(env, case)
        path = split_dir / "imagenet_subsets2/1imgs_class.txt"
        text = path.read_text() + "n00000001_7777.JPEG\n" if case == "missing" else ""
        path.write_text(text)
        extra = ["--split-dir", str(split_dir)]
    out = env["root"] / f"bad-{case}" / "ls.json"
    capsys.readouterr()
    assert lowshot(env, out, *extra, data=data) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    expect = {"missing": "1 of 11 images are not in", "empty": "split file is empty",
              "short": "1 classes have fewer than 5 images for 5-shot: n00000003 (3)"}[case]
    assert expect in err and (case != "missing" or "n00000001_7777.JPEG" in err)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    if case == "short":
        assert lowshot(env, out, "--allow-short", data=data) == 0
        res = json.loads(out.read_text())
        files = res["config"]["splits"]["files"]
        assert files["imagenet_subsets1/5imgs_class.txt"]["short"] == {"n00000003": 3}
        assert res["config"]["splits"]["allow_short"] and res["config"]["splits"]["short_classes"] == 3
        assert {r["n_train"] for r in res["metrics"]["rows"] if r["shots"] == 5} == {48}


def test_non_nested_files_warn_and_plot_compares_runs(env, capsys):
    split_dir = broken_split_dir(env, "nest")
    one = split_dir / "imagenet_subsets1/1imgs_class.txt"
    two = (split_dir / "imagenet_subsets1/2imgs_class.txt").read_text().splitlines()
    other = sorted(p.name for p in (env["data"] / "train" / "n00000001").iterdir()
                   if p.name not in two)
    lines = one.read_text().splitlines()
    one.write_text("\n".join([other[0], *lines[1:]]) + "\n")  # still 1 per class, but not in 2
    out = env["root"] / "nest.json"
    assert lowshot(env, out, "--split-dir", str(split_dir), "--shots", "1", "2") == 0
    warns = json.loads(out.read_text())["config"]["splits"]["warnings"]
    assert any("not nested" in w and "imagenet_subsets1/1imgs_class.txt" in w for w in warns)
    png = env["root"] / "cmp.png"
    assert main(["plot", str(out), str(out.with_name("nest.json")), "--labels", "a", "b",
                 "--out", str(png)]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    pdf = env["root"] / "cmp.pdf"
    assert main(["plot", str(out), "--out", str(pdf)]) == 0 and pdf.read_bytes()[:5] == b"%PDF-"
    capsys.readouterr()
    assert main(["plot", str(out), "--out", str(env["root"] / "cmp.jpg")]) == 2
    assert "cmp.jpg: a figure file must end in .png, .pdf, .svg" in capsys.readouterr().err
    assert not (env["root"] / "cmp.jpg").exists()
    notls = env["root"] / "knn.json"
    notls.write_text(json.dumps({"protocol": "knn", "results": []}))
    assert main(["plot", str(notls), "--out", str(env["root"] / "x.png")]) == 2
    assert "not a low-shot result record (protocol 'knn')" in capsys.readouterr().err
