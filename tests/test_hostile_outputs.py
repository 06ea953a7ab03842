"""Issue 16, careless and hostile outputs: one line and exit 2 before any work, nothing overwritten.

Items 2 (no output over an input or a foreign file), 3 (run-directory markers), 8 (bad shared
options and output paths refused before loading), 16 (no dense stack), 17 (seg crop/stride) and
18 (``--img-size 0``/``--resize 0`` refused, not defaulted).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from moca_eval import outputs
from moca_eval.cli import main
from moca_eval.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
BLOCK_DENSE = '''
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        if top in ("mmengine", "mmseg", "mmdet", "mmcv"):
            raise ModuleNotFoundError(f"No module named {top!r}", name=top)
sys.meta_path.insert(0, Block())
'''


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256: to prove nothing changed."""
    return {str(p.relative_to(root)): sha(p) for p in sorted(root.rglob("*")) if p.is_file()}


def run_cli(argv: list[str], capsys) -> tuple[int, list[str]]:
    """Exit code and the non-empty stderr lines of ``moca-eval argv``."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.fixture
def inputs(tmp_path, tiny_checkpoint, tiny_demo_data) -> tuple[Path, Path]:
    """A private copy of the tiny checkpoint and dataset (the tests check they stay intact)."""
    ckpt = tmp_path / "in" / "tiny.pth"
    ckpt.parent.mkdir()
    shutil.copy(tiny_checkpoint, ckpt)
    data = tmp_path / "in" / "data"
    shutil.copytree(tiny_demo_data, data)
    return ckpt, data


def knn_argv(ckpt: Path, data: Path, tmp_path: Path, *extra: object) -> list[object]:
    return ["knn", "--ckpt", ckpt, "--data", data, "--img-size", 32, "--device", "cpu",
            "--num-workers", 0, "--cache-dir", tmp_path / "cache", *extra]


def refused(code: int, err: list[str], *words: str) -> None:
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("moca-eval: error:") and all(w in err[0] for w in words), err


# ----------------------------------------------------------------------------- item 2
def test_item02_output_equal_to_checkpoint_refused(inputs, tmp_path, capsys):
    ckpt, data = inputs
    before = tree(tmp_path / "in")
    code, err = run_cli(knn_argv(ckpt, data, tmp_path, "--output", ckpt), capsys)
    refused(code, err, "--output", "would overwrite the input file", str(ckpt))
    assert tree(tmp_path / "in") == before and not (tmp_path / "cache").exists()


def test_item02_output_inside_dataset_refused(inputs, tmp_path, capsys):
    ckpt, data = inputs
    before = tree(data)
    code, err = run_cli(knn_argv(ckpt, data, tmp_path, "--output", data / "val" / "results.json"), capsys)
    refused(code, err, "would overwrite the input folder")
    assert tree(data) == before


def test_item02_output_over_a_split_file_refused(inputs, tmp_path, capsys):
    ckpt, data = inputs
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    (split_dir / "1imgs_class.txt").write_text("a.png\n")
    code, err = run_cli(["lowshot", "--ckpt", ckpt, "--data", data, "--split-dir", split_dir,
                         "--output", split_dir / "1imgs_class.txt"], capsys)
    refused(code, err, "would overwrite the input")
    assert (split_dir / "1imgs_class.txt").read_text() == "a.png\n"


def test_item02_plot_over_its_own_input_refused(tmp_path, capsys):
    result = tmp_path / "lowshot.json"
    result.write_text(json.dumps({"schema_version": 1, "protocol": "lowshot"}))
    before = result.read_text()
    code, err = run_cli(["plot", result, "--output", result], capsys)
    refused(code, err, "--output", "would overwrite the input file")
    assert result.read_text() == before


def test_item02_splits_written_inside_the_dataset_refused(inputs, tmp_path, capsys):
    _, data = inputs
    before = tree(data)
    code, err = run_cli(["splits", "make", "--data", data, "--output-dir", data / "train" / "splits"],
                        capsys)
    refused(code, err, "--output-dir", "would overwrite the input folder")
    assert tree(data) == before and not (data / "train" / "splits").exists()


def test_item02_foreign_file_not_replaced(inputs, tmp_path, capsys):
    ckpt, data = inputs
    notes = tmp_path / "notes.json"
    notes.write_text('{"my": "notes"}')
    code, err = run_cli(knn_argv(ckpt, data, tmp_path, "--output", notes), capsys)
    refused(code, err, "was not written by moca-eval knn")
    assert notes.read_text() == '{"my": "notes"}'


def test_item02_another_commands_record_not_replaced(inputs, tmp_path, capsys):
    ckpt, data = inputs
    summary = tmp_path / "summary.json"
    summary.write_text(json.dumps({"schema_version": 1, "protocol": "pretrain", "metrics": {}}))
    before = summary.read_text()
    code, err = run_cli(knn_argv(ckpt, data, tmp_path, "--output", summary), capsys)
    refused(code, err, "was not written by moca-eval knn")
    assert summary.read_text() == before


def test_item02_own_result_record_is_replaced(inputs, tmp_path, capsys):
    ckpt, data = inputs
    out = tmp_path / "knn.json"
    argv = knn_argv(ckpt, data, tmp_path, "--output", out, "--k", 5)
    assert run_cli(argv, capsys)[0] == 0
    first = json.loads(out.read_text())
    assert outputs.written_by_moca_eval(out) and run_cli(argv, capsys)[0] == 0
    assert json.loads(out.read_text())["metrics"] == first["metrics"]


def test_item02_written_by_moca_eval_recognises_only_its_own_files(tmp_path):
    import numpy as np

    record = tmp_path / "r.json"
    record.write_text(json.dumps({"schema_version": 1, "protocol": "knn"}))
    npz = tmp_path / "f.npz"
    np.savez(npz, features=np.zeros(2), labels=np.zeros(2), paths=np.zeros(2), classes=np.zeros(2))
    other = tmp_path / "o.npz"
    np.savez(other, weights=np.zeros(2))
    text = tmp_path / "t.png"
    text.write_bytes(b"\x89PNG not a plot")
    assert outputs.written_by_moca_eval(record) and outputs.written_by_moca_eval(npz)
    assert not any(outputs.written_by_moca_eval(p) for p in (other, text, tmp_path / "missing.json"))


# ----------------------------------------------------------------------------- item 3
def linear_argv(ckpt: Path, data: Path, tmp_path: Path, *extra: object) -> list[object]:
    return ["linear", "--ckpt", ckpt, "--data", data, "--img-size", 32, "--device", "cpu",
            "--num-workers", 0, "--cache-dir", tmp_path / "cache", "--mode", "cached", "--epochs", 1,
            "--global-batch", 16, "--features", "avg", "--single-head", *extra]


def test_item03_linear_refuses_a_pretraining_run_dir(inputs, tmp_path, capsys):
    ckpt, data = inputs
    run = tmp_path / "pretrain-run"
    run.mkdir()
    (run / outputs.MARKER).write_text(json.dumps({"command": "pretrain"}))
    (run / "log.jsonl").write_text('{"epoch": 0, "loss": 9.1}\n')
    before = tree(run)
    code, err = run_cli(linear_argv(ckpt, data, tmp_path, "--output-dir", run), capsys)
    refused(code, err, "a `moca-eval pretrain` run directory", "`linear` will not write")
    assert tree(run) == before and not (tmp_path / "cache").exists()  # refused before extraction


def test_item03_unmarked_non_empty_dir_refused_and_not_marked(inputs, tmp_path, capsys):
    ckpt, data = inputs
    run = tmp_path / "someones-dir"
    run.mkdir()
    (run / "log.jsonl").write_text("precious\n")
    code, err = run_cli(linear_argv(ckpt, data, tmp_path, "--output-dir", run), capsys)
    refused(code, err, "not empty and not a moca-eval linear run directory")
    assert tree(run) == {"log.jsonl": sha(run / "log.jsonl")} and not (run / outputs.MARKER).exists()


def test_item03_new_run_dir_is_marked_with_its_command(inputs, tmp_path, capsys):
    ckpt, data = inputs
    run = tmp_path / "run"
    code, _ = run_cli(linear_argv(ckpt, data, tmp_path, "--output-dir", run), capsys)
    assert code == 0 and outputs.run_dir_owner(run) == "linear"
    code, err = run_cli(["finetune", "--ckpt", ckpt, "--data", data, "--output-dir", run], capsys)
    refused(code, err, "a `moca-eval linear` run directory")


# ----------------------------------------------------------------------------- items 8 and 18
BAD_OPTIONS = [
    (["--batch-size", 0], "--batch-size must be >= 1"),
    (["--num-workers", -1], "--num-workers must be >= 0"),
    (["--img-size", -32], "--img-size must be >= 1"),
    (["--img-size", 0], "--img-size must be >= 1"),  # item 18: not silently 224
    (["--resize", -1], "--resize must be >= 1"),
    (["--resize", 0], "--resize must be >= 1"),  # item 18: not silently img_size / 0.875
    (["--device", "gpu"], "expected auto, cpu, cuda or cuda:N"),
    (["--device", "cuda:99"], "CUDA GPU(s)"),
]


@pytest.mark.parametrize("command", ["knn", "linear", "finetune", "extract"])
@pytest.mark.parametrize(("extra", "words"), BAD_OPTIONS, ids=[" ".join(map(str, e)) for e, _ in BAD_OPTIONS])
def test_item08_bad_options_refused_before_loading(command, extra, words, tmp_path, capsys):
    """The checkpoint does not exist: the option is refused before anything looks at it."""
    argv = [command, "--ckpt", tmp_path / "missing.pth", "--data", tmp_path / "nodata", *extra]
    if command == "extract":
        argv += ["--output", tmp_path / "f.npz"]
    code, err = run_cli(argv, capsys)
    refused(code, err, words)
    assert sorted(tmp_path.iterdir()) == []


def output_cases(tmp_path: Path) -> list[tuple[list[object], str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    (tmp_path / "a-dir").mkdir()
    return [
        (["--output", tmp_path / "a-dir"], "is a directory"),
        (["--output", a_file / "out.json"], "is a file, not a folder"),
        (["--cache-dir", a_file], "is a file, not a folder"),
        (["--cache-dir", a_file / "cache"], "is a file, not a folder"),
        (["--output-dir", a_file / "run"], "is a file, not a folder"),
    ]


@pytest.mark.parametrize("case", range(5))
def test_item08_unusable_output_paths_refused_before_computing(case, tmp_path, capsys):
    extra, words = output_cases(tmp_path)[case]
    before = tree(tmp_path)
    code, err = run_cli(["linear", "--ckpt", tmp_path / "missing.pth", "--data", tmp_path / "nodata",
                         *extra], capsys)
    refused(code, err, words)
    assert tree(tmp_path) == before


def test_item08_unwritable_output_refused_before_computing(tmp_path, capsys):
    try:
        tempfile.mkstemp(dir="/sys")
        pytest.skip("/sys is writable here (no read-only folder to test with)")
    except OSError:
        pass
    code, err = run_cli(["knn", "--ckpt", tmp_path / "missing.pth", "--data", tmp_path,
                         "--output", "/sys/moca-eval-results.json"], capsys)
    refused(code, err, "cannot write in /sys")


# ----------------------------------------------------------------------------- item 16
def run_without_dense(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK_DENSE + code], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("command", ["seg", "det"])
def test_item16_missing_dense_stack_is_one_line_with_the_install_hint(command, tmp_path):
    argv = [command, "--ckpt", f"{tmp_path}/x.pth", "--data", f"{tmp_path}/d",
            "--output-dir", f"{tmp_path}/r"]
    proc = run_without_dense(f"from moca_eval.cli import main\nsys.exit(main({argv!r}))")
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "stack is not installed" in err[0] and "python -m moca_eval.install_dense" in err[0]
    assert not (tmp_path / "r").exists()


def test_item16_dense_tests_skip_at_collection_without_the_stack():
    dense_tests = ["tests/segmentation", "tests/detection", "tests/test_mm_utils.py", "tests/test_mm_ops.py"]
    proc = run_without_dense("import pytest\nsys.exit(pytest.main(['--collect-only', '-q', '-p', "
                             f"'no:cacheprovider', *{dense_tests!r}]))")
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "ERROR" not in proc.stdout and "errors during collection" not in proc.stdout
    assert proc.stdout.count("SKIPPED") >= 4 and "the [dense] extra is not installed" in proc.stdout


# ----------------------------------------------------------------------------- item 17
def test_item17_stride_is_derived_from_the_crop():
    pytest.importorskip("mmseg", reason="the [dense] extra is not installed")
    from moca_eval.segmentation.run import SegConfig

    assert SegConfig(backbone=Path("x.pth"), data=Path("d")).stride == 512  # Segmenter: 768 -> 512
    assert SegConfig(backbone=Path("x.pth"), data=Path("d"), crop_size=128).validate().stride == 85
    with pytest.raises(ConfigError, match="stride 512 exceeds crop size 128"):
        SegConfig(backbone=Path("x.pth"), data=Path("d"), crop_size=128, stride=512).validate()


def test_item17_seg_stride_above_crop_refused_before_training(tiny_checkpoint, tmp_path, capsys):
    pytest.importorskip("mmseg", reason="the [dense] extra is not installed")
    code, err = run_cli(["seg", "--ckpt", tiny_checkpoint, "--data", tmp_path / "d", "--crop-size", 128,
                         "--stride", 512, "--output-dir", tmp_path / "run"], capsys)
    refused(code, err, "stride 512 exceeds crop size 128")
    assert not (tmp_path / "run").exists()


def test_claim_run_dir_removes_only_stale_temps(tmp_path):
    (tmp_path / outputs.MARKER).write_text(json.dumps({"command": "linear"}))
    (tmp_path / ".checkpoint.pth.ab12cd.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "checkpoint.pth").write_bytes(b"whole")
    outputs.claim_run_dir(tmp_path, "linear")
    assert sorted(p.name for p in tmp_path.iterdir()) == [outputs.MARKER, "checkpoint.pth"]
