"""``moca-eval run`` end to end: two tiny checkpoints (MOCA and DINO layouts) x k-NN, low-shot and
a cached linear probe; killed after its first finished cell, run again, then reported."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from layouts import layout_checkpoint, random_vit

from moca_eval.cli import main
from moca_eval.record import validate_record
from moca_eval.reporting import find_records, write_report

SUITE = """\
name = "e2e"
output = "out"
data = "{data}"
checkpoints = ["{moca}", {{path = "{dino}", label = "dino-tiny"}}]
protocols = ["knn", "lowshot", "linear"]

[backbone]
img_size = 32

[runtime]
batch_size = 32
num_workers = 0
cache_dir = "cache"

[protocol.knn]
ks = [5]

[protocol.lowshot]
shots = [1, 2]
solver = "torch"

[protocol.linear]
mode = "cached"
epochs = 2
batch_size = 16
lr_grid = [0.1, 1.0]
"""


@pytest.fixture(scope="module")
def dino_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_arch) -> Path:
    teacher, student = random_vit(tiny_arch, 1).state_dict(), random_vit(tiny_arch, 2).state_dict()
    path = tmp_path_factory.mktemp("dino") / "dino-full.pth"
    torch.save(layout_checkpoint("dino-full", teacher, student)[0], path)
    return path


@pytest.fixture()
def suite_file(tmp_path: Path, tiny_demo_data: Path, tiny_checkpoint: Path, dino_checkpoint: Path) -> Path:
    path = tmp_path / "suite.toml"
    path.write_text(SUITE.format(data=tiny_demo_data, moca=tiny_checkpoint, dino=dino_checkpoint))
    return path


def _cells(out: Path) -> dict[str, Path]:
    """Finished cells (record written, then ``cell.json`` marked done): ``checkpoint dir/entry dir``
    -> record.json. A record whose cell.json is not done yet (killed in between) is rerun."""
    return {f"{p.parent.parent.name}/{p.parent.name}": p for p in out.glob("*/*/record.json")
            if _status(p.parent / "cell.json") == "done"}


def _status(path: Path) -> str | None:
    try:
        return json.loads(path.read_text())["payload"]["status"]
    except (OSError, ValueError, KeyError):
        return None


def _kill_after_first_record(suite_file: Path, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "moca_eval", "run", str(suite_file), "--no-progress"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not _cells(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_suite_killed_midway_reruns_only_missing_cells_and_report_matches_records(
        suite_file: Path, capsys: pytest.CaptureFixture) -> None:
    out = suite_file.parent / "out"
    _kill_after_first_record(suite_file, out)
    before = {cell: (path.stat().st_mtime_ns, path.read_bytes()) for cell, path in _cells(out).items()}
    assert 1 <= len(before) < 6, f"the kill should land midway, found {len(before)} finished cells"

    capsys.readouterr()
    assert main(["run", str(suite_file), "--no-progress"]) == 0
    summary = capsys.readouterr().out
    after = _cells(out)
    assert len(after) == 6
    for cell, (mtime, blob) in before.items():  # finished cells were reused, not rerun
        assert after[cell].stat().st_mtime_ns == mtime and after[cell].read_bytes() == blob
    assert f"6 cells, {6 - len(before)} run, {len(before)} reused, 0 failed" in summary
    reused = {line.split()[1] for line in summary.splitlines() if " reused " in f" {line} "}
    assert len(reused) <= 3 and all(e in ("knn", "lowshot", "linear") for e in reused)

    capsys.readouterr()
    assert main(["run", str(suite_file), "--no-progress"]) == 0  # everything reused now
    assert "6 cells, 0 run, 6 reused, 0 failed" in capsys.readouterr().out

    records = [json.loads(p.read_text()) for p in after.values()]
    for record in records:
        validate_record(record)
    assert {r["checkpoint"]["label"] for r in records} == {"tiny-moca", "dino-tiny"}
    assert {r["checkpoint"]["family"] for r in records} == {"moca", "dino"}
    _check_report(out, suite_file.parent / "report", records)


def _expected(records: list[dict]) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(checkpoint label, column) -> (mean, std), read straight from the records."""
    out = {}
    for r in records:
        label, m = r["checkpoint"]["label"], r["metrics"]
        if r["protocol"] == "knn":
            out[(label, "k-NN top-1")] = (m["headline"]["value"], None)
        elif r["protocol"] == "linear":
            out[(label, "linear top-1")] = (m["headline"]["value"], None)
        else:
            for s in m["splits"]:
                out[(label, f"low-shot {s['setting']}")] = (s["mean"], s["std"])
    return out


def _check_report(runs: Path, report_dir: Path, records: list[dict]) -> None:
    written = write_report([runs], report_dir, decimals=2)
    expected = _expected(records)
    columns = ["k-NN top-1", "low-shot 1-shot", "low-shot 2-shot", "linear top-1"]
    assert {c for _, c in expected} == set(columns)

    with open(written["table.csv"]) as handle:
        rows = {row["checkpoint"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"tiny-moca", "dino-tiny"}
    for (label, column), (mean, std) in expected.items():
        assert float(rows[label][column]) == mean
        if std is not None:
            assert float(rows[label][f"{column} std"]) == std

    md = written["table.md"].read_text().splitlines()
    assert md[0] == "| checkpoint | " + " | ".join(columns) + " |"
    md_rows = {line.split(" | ")[0].lstrip("| "): line.strip("| ").split(" | ")[1:] for line in md[2:4]}
    tex = written["table.tex"].read_text()
    for label in ("tiny-moca", "dino-tiny"):
        for column, text in zip(columns, md_rows[label]):
            mean, std = expected[(label, column)]
            want = f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")
            assert text.rstrip("†*") == want, (label, column, text)
            # k-NN features (avg vs cls) and the recipes differ between the two families: flagged
            assert text.endswith("†")
        tex_row = next(line for line in tex.splitlines() if line.startswith(label))
        tex_cells = [c.strip().removesuffix(r"\\").strip() for c in tex_row.split("&")[1:]]
        for column, text in zip(columns, tex_cells):
            mean, std = expected[(label, column)]
            want = f"${mean:.2f}" + (rf" \pm {std:.2f}" if std is not None else "") + "$"
            assert text == want + r"\textsuperscript{\dag}"
    assert r"\toprule" in tex and r"\bottomrule" in tex
    assert any("k-NN top-1: settings differ (feature:" in line for line in md)
    assert written["lowshot.png"].stat().st_size > 10_000 and written["knn.png"].stat().st_size > 5_000
    assert len(find_records([runs])) == 6  # cell.json files are not records


@pytest.mark.parametrize(("text", "message"), [  # lines 1-2: data and checkpoints
    ('name = "x"\nprotocls = ["knn"]\n', "suite.toml:4: unknown key 'protocls' (close: protocols"),
    ('protocols = ["knn", "lowshoot"]\n', "suite.toml:3: unknown protocol 'lowshoot' (close: lowshot"),
    ('protocols = ["knn"]\n[protocol.knn]\nks = [5]\ntemperature = [0.1]\n',
     "suite.toml:6: unknown knn setting 'temperature' (close: temperatures"),
    ('protocols = ["knn"]\n[runtime]\nbatch = 3\n', "suite.toml:5: unknown key 'batch' in [runtime]"),
])
def test_suite_file_errors_name_file_line_and_close_matches(tmp_path: Path, tiny_demo_data: Path,
                                                             tiny_checkpoint: Path, text: str,
                                                             message: str, capsys) -> None:
    path = tmp_path / "suite.toml"
    path.write_text(f'data = "{tiny_demo_data}"\ncheckpoints = ["{tiny_checkpoint}"]\n' + text)
    assert main(["run", str(path), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "o").exists()  # nothing ran


def test_missing_checkpoint_in_suite_names_line_and_close_file(tmp_path: Path, tiny_demo_data: Path,
                                                               capsys) -> None:
    (tmp_path / "teacher.pth").write_bytes(b"")
    path = tmp_path / "suite.yaml"
    path.write_text(f"data: {tiny_demo_data}\nprotocols: [knn]\ncheckpoints:\n  - teachr.pth\n")
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "suite.yaml:4:" in err and "teachr.pth: no such checkpoint file" in err
    assert "(close: teacher.pth)" in err


def test_failing_cell_is_recorded_and_the_others_run(tmp_path: Path, tiny_demo_data: Path,
                                                     tiny_checkpoint: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    # 10 classes x 6 train images: 7 shots per class cannot be drawn -> that cell fails at run time
    path = tmp_path / "suite.toml"
    path.write_text(f'data = "{tiny_demo_data}"\ncheckpoints = ["{tiny_checkpoint}"]\n'
                    'protocols = ["knn", "seven"]\n[backbone]\nimg_size = 32\n'
                    '[runtime]\nnum_workers = 0\ncache_dir = "c"\n[protocol.knn]\nks = [5]\n'
                    '[protocol.seven]\nprotocol = "lowshot"\nshots = [7]\nsolver = "torch"\n')
    assert main(["run", str(path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "2 cells, 1 run, 0 reused, 1 failed" in out
    failed = json.loads(next(tmp_path.glob("runs/suite/*/seven-*/cell.json")).read_text())["payload"]
    assert failed["status"] == "failed" and failed["error"]
    assert next(tmp_path.glob("runs/suite/*/knn-*/record.json")).is_file()


def test_paper_suite_file_has_the_papers_classification_settings(tiny_demo_data: Path,
                                                                   tiny_checkpoint: Path) -> None:
    from importlib import resources

    from moca_eval.suite_file import build_suite, read_suite_file

    path = Path(str(resources.files("moca_eval").joinpath("suites/paper.toml")))
    raw, source = read_suite_file(path)
    assert [c["label"] for c in raw["checkpoints"]] == ["MOCA", "DINO", "MAE"]
    raw.update(checkpoints=[str(tiny_checkpoint)], data=str(tiny_demo_data))  # as --ckpt/--data do
    suite = build_suite(raw, source)
    settings = {e.name: (e.protocol, e.settings) for e in suite.entries}
    assert settings["knn"] == ("knn", {"ks": [20], "temperatures": [0.07]})
    assert settings["lowshot"] == ("lowshot", {"shots": [1, 2, 5], "percents": [1.0], "n_splits": 3})
    assert settings["linear"] == ("linear", {"mode": "augmented"})
    assert set(raw["protocol"]) >= {"seg_linear_100", "seg_finetune_100", "coco"}


def test_half_done_training_cell_resumes_from_its_checkpoint(suite_file: Path, caplog) -> None:
    """A cell killed after its training checkpoint but before its record: the rerun resumes
    (no epoch retrained) and writes the same numbers."""
    import logging

    text = suite_file.read_text().replace('checkpoints = [', 'checkpoints = [').replace(
        'protocols = ["knn", "lowshot", "linear"]', 'protocols = ["linear"]')
    suite_file.write_text(text.replace(', {path = ', ']\n#', 1).replace('label = "dino-tiny"}]', ''))
    assert main(["run", str(suite_file), "--no-progress"]) == 0
    record_path = next((suite_file.parent / "out").glob("*/linear-*/record.json"))
    first = json.loads(record_path.read_text())
    assert (record_path.parent / "train" / "checkpoint.pth").is_file()
    record_path.unlink()  # as if killed between the last checkpoint and the record
    state = json.loads((record_path.parent / "cell.json").read_text())
    state["payload"]["status"] = "running"
    (record_path.parent / "cell.json").write_text(json.dumps(state))
    with caplog.at_level(logging.INFO, logger="moca_eval.runtime"):
        assert main(["run", str(suite_file), "--no-progress"]) == 0
    assert any("resuming from" in r.getMessage() for r in caplog.records)
    again = json.loads(record_path.read_text())
    assert again["metrics"]["rows"] == first["metrics"]["rows"]
    assert again["metrics"]["headline"] == first["metrics"]["headline"]


def test_flags_only_suite_with_set_and_limit(tmp_path: Path, tiny_demo_data: Path, tiny_checkpoint: Path,
                                             capsys) -> None:
    out = tmp_path / "o"
    assert main(["run", "--ckpt", str(tiny_checkpoint), "--protocols", "knn", "--data", str(tiny_demo_data),
                 "--output-dir", str(out), "--limit", "3", "--num-workers", "0", "--cache-dir",
                 str(tmp_path / "c"), "--set", "knn.ks=[5, 10]", "backbone.img_size=32", "knn.feature=cls",
                 "--no-progress"]) == 0
    record = json.loads(next(out.glob("tiny-moca-*/knn-*/record.json")).read_text())
    assert record["dataset"]["limit"] == 3 and record["dataset"]["splits"] == {"train": 30, "val": 30}
    assert record["config"]["ks"] == [5, 10] and record["config"]["feature"] == "cls"
    assert record["checkpoint"]["arch_spec"]["img_size"] == 32
    assert main(["run", "--ckpt", str(tiny_checkpoint), "--protocols", "knn", "--data", str(tiny_demo_data),
                 "--set", "knn.k=[5]"]) == 2
    assert "command line: unknown knn setting 'k' (close: ks" in capsys.readouterr().err


def test_relative_paths_in_a_suite_file_are_relative_to_it(tmp_path: Path) -> None:
    from moca_eval.suite_file import read_suite_file

    path = tmp_path / "sub" / "s.toml"
    path.parent.mkdir()
    path.write_text('data = "d"\noutput = "o"\ncheckpoints = ["a.pth", "hf-hub:x/y", {path = "b.pth"}]\n'
                    '[runtime]\ncache_dir = "c"\n[protocol.lowshot]\nsplit_dir = "s"\n')
    raw, _ = read_suite_file(path)
    base = str(path.parent)
    got = (raw["data"], raw["output"], raw["runtime"]["cache_dir"])
    assert got == (f"{base}/d", f"{base}/o", f"{base}/c")
    assert raw["checkpoints"] == [f"{base}/a.pth", "hf-hub:x/y", {"path": f"{base}/b.pth"}]
    assert raw["protocol"]["lowshot"]["split_dir"] == f"{base}/s"


def test_torchrun_two_processes_run_the_suite_with_one_processes_numbers(
        tmp_path: Path, tiny_demo_data: Path, tiny_checkpoint: Path) -> None:
    """``torchrun -m moca_eval run``: every process walks the same cells, the main one writes them;
    records equal a single process's (k-NN, cached linear probe)."""
    args = ["run", "--ckpt", str(tiny_checkpoint), "--protocols", "knn", "linear", "--data",
            str(tiny_demo_data), "--no-progress", "--num-workers", "0", "--batch-size", "8",
            "--set", "knn.ks=[5]", "linear.mode=cached", "linear.epochs=2", "linear.batch_size=12",
            "linear.lr_grid=[0.1,1.0]", "backbone.img_size=32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = {}
    for nproc in (1, 2):
        out = tmp_path / f"runs{nproc}"
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
        proc = subprocess.run([*launcher, "-m", "moca_eval", *args, "--output-dir", str(out),
                               "--cache-dir", str(tmp_path / f"cache{nproc}")],
                              capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        records = {p.parent.name.split("-")[0]: json.loads(p.read_text()) for p in _cells(out).values()}
        assert sorted(records) == ["knn", "linear"]
        metrics[nproc] = {name: r["metrics"]["rows"] for name, r in records.items()}
        assert not list(out.rglob("*.tmp"))
    assert metrics[2]["knn"] == metrics[1]["knn"]
    for one, two in zip(metrics[1]["linear"], metrics[2]["linear"]):
        assert one.keys() == two.keys()
        for key, value in one.items():
            want = pytest.approx(two[key], abs=1e-4) if isinstance(value, float) else two[key]
            assert value == want, key
