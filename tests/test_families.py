"""The checkpoint's family drives every frozen-feature protocol's defaults (PROTOCOLS.md), and every
protocol writes the same versioned record."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from layouts import LAYOUT_ARCH, SMALL, layout_checkpoint, random_vit

from moca_eval.checkpoint_formats import FORMATS, FORMATS_BY_NAME
from moca_eval.cli import main
from moca_eval.families import FAMILIES, GENERIC, RECIPES_VERSION
from moca_eval.protocols.finetune import FINETUNE_RECIPES
from moca_eval.protocols.linear import DEFAULT_FEATURES, LINEAR_RECIPES
from moca_eval.protocols.lowshot import LOWSHOT_RECIPES, LOWSHOT_RECIPES_VERSION
from moca_eval.record import validate_record

MSN_LAMBDA = (2.5e-4,)  # MSN's protocol, the fallback of families without a low-shot recipe
# family: (k-NN/extract feature, low-shot feature, low-shot lambdas, linear features), PROTOCOLS.md
EXPECTED = {
    "moca": ("avg", "avg-prenorm", (0.1,), DEFAULT_FEATURES),
    "dino": ("cls", "cls", MSN_LAMBDA, (*DEFAULT_FEATURES, "cls-last4")),
    "ibot": ("cls", "cls", (0.01, 0.1, 1.0), DEFAULT_FEATURES),
    "mae": ("cls", "cls", MSN_LAMBDA, DEFAULT_FEATURES),
    "msn": ("cls", "cls-prenorm", MSN_LAMBDA, DEFAULT_FEATURES),
    "mocov3": ("cls", "cls", MSN_LAMBDA, DEFAULT_FEATURES),
    "dinov2": ("cls", "cls", MSN_LAMBDA, DEFAULT_FEATURES),
    GENERIC: ("cls", "cls", MSN_LAMBDA, DEFAULT_FEATURES),
}
RUNTIME = ["--img-size", "32", "--device", "cpu", "--num-workers", "0", "--batch-size", "16"]


def test_every_family_has_a_recipe_for_every_protocol() -> None:
    assert set(EXPECTED) == set(FAMILIES.names())
    for registry in (LINEAR_RECIPES, LOWSHOT_RECIPES, FINETUNE_RECIPES):
        assert set(FAMILIES.names()) <= set(registry.names()), registry.kind
    for fmt in FORMATS:
        assert all(f in FAMILIES for f in fmt.families) and fmt.families


def _layout_for(family: str) -> tuple[str, list[str]]:
    """The layout whose first family is ``family`` (else a plain state dict with --family)."""
    fmt = next((f.name for f in FORMATS if f.families[0] == family), None)
    return (fmt, []) if fmt else ("bare", ["--family", family])


def _checkpoint(fmt: str, path: Path) -> Path:
    arch = LAYOUT_ARCH.get(fmt, SMALL)
    ckpt, _ = layout_checkpoint(fmt, random_vit(arch, 0).state_dict(), random_vit(arch, 1).state_dict())
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("family", FAMILIES.names())
def test_family_decides_every_frozen_feature_protocol(family: str, tiny_demo_data: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    fmt, extra = _layout_for(family)
    ckpt = _checkpoint(fmt, tmp_path / f"{family}.pth")
    feature, lowshot_feature, lambdas, linear_features = EXPECTED[family]
    common = ["--ckpt", str(ckpt), "--data", str(tiny_demo_data), *extra, *RUNTIME,
              "--cache-dir", str(tmp_path / "cache")]
    out = {name: tmp_path / f"{name}.json" for name in ("knn", "lowshot", "linear")}
    assert main(["knn", *common, "--k", "5", "--output", str(out["knn"])]) == 0
    assert main(["lowshot", *common, "--shots", "1", "--splits", "1", "--output", str(out["lowshot"])]) == 0
    assert main(["linear", *common, "--mode", "cached", "--epochs", "1", "--global-batch", "20",
                 "--lrs", "0.1", "--output-dir", str(tmp_path / "linear"),
                 "--output", str(out["linear"])]) == 0
    assert main(["extract", *common, "--split", "val", "--output", str(tmp_path / "val.npz")]) == 0
    assert f" {feature} features of " in capsys.readouterr().out  # extract's default is the family's

    records = {name: json.loads(path.read_text()) for name, path in out.items()}
    for name, record in records.items():
        validate_record(record)
        assert record["protocol"] == name and record["checkpoint"]["family"] == family
        assert record["checkpoint"]["layout"] == fmt
        shared = len(FORMATS_BY_NAME[fmt].families) > 1
        assert record["checkpoint"]["family_source"] == ("--family" if extra else "assumed" if shared
                                                         else "layout")
    knn, lowshot, linear = records["knn"], records["lowshot"], records["linear"]
    assert knn["config"]["feature"] == feature and knn["config"]["recipe"]["name"] == family
    assert lowshot["config"]["recipe"]["name"] == family and lowshot["config"]["feature"] == lowshot_feature
    assert tuple(lowshot["config"]["classifier"]["lambdas"]) == lambdas
    assert lowshot["config"]["recipe"]["version"] == LOWSHOT_RECIPES_VERSION
    assert linear["config"]["recipe"]["name"] == family
    assert linear["config"]["recipe"]["why"] == f"family {family}; overridden: batch_size, epochs, lr_grid"
    assert tuple(linear["config"]["recipe"]["values"]["features"]) == linear_features
    assert linear["config"]["recipe"]["version"] == RECIPES_VERSION
    # records of two protocols differ only in protocol, config and metrics (and provenance times)
    for other in (lowshot, linear):
        assert other["checkpoint"] == knn["checkpoint"] and other["dataset"] == knn["dataset"]
        assert other["schema_version"] == knn["schema_version"] == 1
        same = {k: v for k, v in other["provenance"].items() if "utc" not in k and k != "wall_time_s"}
        assert same == {k: v for k, v in knn["provenance"].items() if "utc" not in k and k != "wall_time_s"}
    # the headline is what each protocol documents: the first (k, T); the 1-shot mean; the selected head
    assert knn["metrics"]["headline"]["value"] == knn["metrics"]["rows"][0]["top1"]
    first_lambda = [r["top1"] for r in lowshot["metrics"]["rows"] if r["lambd"] == min(lambdas)]
    assert lowshot["metrics"]["headline"]["value"] == pytest.approx(np.mean(first_lambda), abs=1e-3)
    assert linear["metrics"]["headline"]["value"] == linear["metrics"]["values"]["selected"]["val_top1"]


def test_shared_layout_says_what_it_assumed_and_family_overrides_it(
        tiny_demo_data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ckpt = _checkpoint("model-wrapped", tmp_path / "teacher.pth")  # MOCA extracted teacher or MAE?
    common = ["knn", "--ckpt", str(ckpt), "--data", str(tiny_demo_data), *RUNTIME, "--k", "5",
              "--cache-dir", str(tmp_path / "cache")]
    with caplog.at_level("INFO", logger="moca_eval.families"):
        assert main([*common, "--output", str(tmp_path / "a.json")]) == 0
    assumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("knn: family")]
    assert assumed == ["knn: family moca (layout model-wrapped is saved by moca, mae, timm; assumed moca "
                       "(pass --family mae or --family timm if it is mae, timm)); recipe moca (feature avg) "
                       "(family moca)"]
    assert main([*common, "--family", "mae", "--output", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert (a["checkpoint"]["family_source"], a["config"]["feature"]) == ("assumed", "avg")
    assert (b["checkpoint"]["family_source"], b["config"]["feature"]) == ("--family", "cls")


@pytest.mark.parametrize("argv, message", [
    (["--family", "dinno"], "--family: unknown family 'dinno'; did you mean dino"),
    (["--recipe", "mocca"], "unknown linear recipe 'mocca'; did you mean moca"),
])
def test_unknown_family_or_recipe_is_one_line_with_close_matches(
        argv: list[str], message: str, tiny_checkpoint: Path, tiny_demo_data: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    code = main(["linear", "--ckpt", str(tiny_checkpoint), "--data", str(tiny_demo_data), *RUNTIME,
                 "--output-dir", str(tmp_path / "run"), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and len(err) == 1
    assert not (tmp_path / "run").exists()
