"""``--limit`` and the report's flags: non-comparable smoke runs, schema versions, published rows,
Cityscapes columns and figures."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

import moca_eval
from moca_eval.cli import main
from moca_eval.errors import ConfigError
from moca_eval.pipeline import DataConfig
from moca_eval.reporting import build_table, find_records, to_markdown, write_report


@pytest.fixture(scope="module")
def knn_records(tiny_demo_data: Path, tiny_checkpoint: Path, tmp_path_factory) -> tuple[dict, dict]:
    """The same k-NN run on the full tiny data and with ``limit=2``."""
    common = dict(ks=(5,), img_size=32, batch_size=32, num_workers=0,
                  cache_dir=tmp_path_factory.mktemp("cache"))
    full = moca_eval.evaluate(tiny_checkpoint, "knn", tiny_demo_data, **common).to_dict()
    limited = moca_eval.evaluate(tiny_checkpoint, "knn", tiny_demo_data, limit=2, **common).to_dict()
    return full, limited


def test_limit_keeps_first_images_per_class_or_a_fraction(tiny_demo_data: Path) -> None:
    train, val = DataConfig(tiny_demo_data, limit=2).splits()  # 10 classes x 6 train / 3 val
    assert (len(train), len(val)) == (20, 20)
    full_train, _ = DataConfig(tiny_demo_data).splits()
    assert train.samples == [s for s in full_train.samples if full_train.samples.index(s) % 6 < 2]
    train, val = DataConfig(tiny_demo_data, limit=0.5).splits()  # ceil(3.0), ceil(1.5)
    assert (len(train), len(val)) == (30, 20)
    for bad in (1.5, 0, -1):
        with pytest.raises(ConfigError, match="--limit"):
            DataConfig(tiny_demo_data, limit=bad)


def test_limit_is_recorded_and_reported_non_comparable(knn_records, tmp_path: Path) -> None:
    full, limited = knn_records
    assert limited["dataset"]["limit"] == 2 and "limit" not in full["dataset"]
    assert limited["dataset"]["splits"] == {"train": 20, "val": 20}
    for name, record in (("full", full), ("limited", limited)):
        record = {**record, "checkpoint": {**record["checkpoint"], "label": name}}
        (tmp_path / f"{name}.json").write_text(json.dumps(record))
    table = build_table(find_records([tmp_path]))
    cells = {r.label: r.cells["k-NN top-1"] for r in table.rows}
    assert set(cells) == {"full", "full (limit 2)"}  # one checkpoint: its smoke run gets its own row
    assert cells["full (limit 2)"].flags == "†*" and cells["full"].flags == "†"
    assert cells["full (limit 2)"].mean == limited["metrics"]["headline"]["value"]
    md = to_markdown(table)
    assert "* --limit smoke run: not comparable with full runs" in md
    assert "limit: full=None, full (limit 2)=2" in md and "dataset: full=" in md


def test_cli_limit_flag_reaches_the_record(tiny_demo_data: Path, tiny_checkpoint: Path,
                                           tmp_path: Path) -> None:
    out = tmp_path / "knn.json"
    assert main(["knn", "--ckpt", str(tiny_checkpoint), "--data", str(tiny_demo_data), "--img-size", "32",
                 "--k", "5", "--num-workers", "0", "--limit", "0.5", "--output", str(out)]) == 0
    assert json.loads(out.read_text())["dataset"]["limit"] == 0.5
    npz = tmp_path / "val.npz"
    assert main(["extract", "--ckpt", str(tiny_checkpoint), "--data", str(tiny_demo_data), "--img-size",
                 "32", "--split", "val", "--num-workers", "0", "--limit", "2", "--output", str(npz)]) == 0
    import numpy as np

    assert np.load(npz)["features"].shape[0] == 20  # 10 classes x 2


def test_schema_versions_published_rows_seg_columns_and_pdf(knn_records, tmp_path: Path) -> None:
    full, _ = knn_records
    newer = {**copy.deepcopy(full), "schema_version": 2}
    seg = copy.deepcopy(full)
    seg["protocol"] = "seg"
    seg["metrics"]["splits"] = [{"setting": f"{mode} {size}", "values": [v, v + 2], "n_splits": 2,
                                 "mean": v + 1, "std": 1.0}
                                for mode, base in (("linear", 30.0), ("finetune", 40.0))
                                for size, v in (("100", base), ("372", base + 5), ("full", base + 9))]
    for name, record in (("a.json", full), ("b.json", newer), ("seg.json", seg)):
        (tmp_path / "in" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_text(json.dumps(record))
    written = write_report([tmp_path / "in"], tmp_path / "out", published=True, figure_format="pdf")
    md = written["table.md"].read_text()
    assert "records have different schema versions: v1: 2 (a.json, seg.json); v2: 1 (b.json)" in md
    # published rows fill the measured columns only (PROTOCOLS.md: k-NN, Cityscapes Table 6)
    assert "| MOCA (published) | 77.2 | 49.9 | 55.2 | 60.1 | 51.5 | 71.1 | 78.2 |" in md
    assert "MSN (published)" not in md  # nothing published in these columns
    header = md.splitlines()[0]
    assert "seg linear 100" in header and "seg finetune full" in header
    row = next(line for line in md.splitlines() if line.startswith("| tiny-moca |"))
    assert "31.0 ± 1.0" in row and "50.0 ± 1.0" in row  # linear 100, finetune full
    for name in ("lowshot.pdf", "knn.pdf", "seg.pdf"):
        if name == "lowshot.pdf":
            assert name not in written  # no measured low-shot records
            continue
        assert written[name].read_bytes().startswith(b"%PDF")
    assert r"\midrule" in written["table.tex"].read_text().split("MOCA (published)")[0]


def test_report_rejects_a_non_record_file(tmp_path: Path, capsys) -> None:
    (tmp_path / "x.json").write_text("{}")
    assert main(["report", str(tmp_path / "x.json"), "--out", str(tmp_path / "o")]) == 2
    assert "x.json: not a moca-eval result record" in capsys.readouterr().err


def test_columns_follow_the_papers_order_with_extra_settings_in_their_group() -> None:
    from moca_eval.reporting import column_key

    columns = ["linear top-1", "low-shot 1%", "low-shot 5-shot", "low-shot 3-shot", "k-NN top-1",
               "seg finetune 100", "seg linear 100", "low-shot 50%", "COCO AP box", "seg linear custom"]
    assert sorted(columns, key=column_key) == [
        "k-NN top-1", "low-shot 3-shot", "low-shot 5-shot", "low-shot 1%", "low-shot 50%", "linear top-1",
        "seg linear 100", "seg finetune 100", "seg linear custom", "COCO AP box"]


def test_pretraining_time_joins_the_knn_row_of_the_same_checkpoint(knn_records, tmp_path: Path) -> None:
    """A ``pretrain`` record of the evaluated teacher (same sha256) adds its training time x
    processes to that checkpoint's row, and the k-NN vs pretraining-time figure is drawn."""
    from moca_eval.record import metrics_block

    full, _ = knn_records
    other = copy.deepcopy(full)
    other["checkpoint"].update(sha256="f" * 64, path="/elsewhere/longer-run.pth")
    other["metrics"]["headline"]["value"] = full["metrics"]["headline"]["value"] + 5
    records = {"knn.json": full, "knn-longer.json": other}
    for name, knn, seconds, world in (("pre.json", full, 5400.0, 2), ("pre-longer.json", other, 7200.0, 4)):
        pre = copy.deepcopy(knn)
        pre["protocol"] = "pretrain"
        pre["metrics"] = metrics_block("loss", 3.0, values={"train_time_s": seconds, "world_size": world})
        records[name] = pre
    for name, record in records.items():
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_text(json.dumps(record))
    table = build_table(find_records([tmp_path / "in"]))
    hours = {r.label: (r.cells["pretraining h"].mean, r.cells["k-NN top-1"].mean) for r in table.rows}
    assert hours == {"tiny-moca": (3.0, full["metrics"]["headline"]["value"]),
                     "longer-run": (8.0, other["metrics"]["headline"]["value"])}
    assert table.columns[-1] == "pretraining h"
    written = write_report([tmp_path / "in"], tmp_path / "out")
    assert written["knn_time.png"].stat().st_size > 5_000
