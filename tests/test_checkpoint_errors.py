"""Bad checkpoints: ``load_backbone`` raises one clear line naming the file and what is wrong,
and the CLI turns it into exit code 2, one stderr line and no output file."""

from __future__ import annotations

import io
import pickle
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moca_eval.checkpoint_formats import FORMATS_BY_NAME
from moca_eval.checkpoint_io import read_checkpoint
from moca_eval.checkpoints import load_backbone
from moca_eval.cli import main
from moca_eval.errors import CheckpointError, ConfigError

KNOWN_LAYOUTS = ", ".join(FORMATS_BY_NAME)


def _teacher(tiny_checkpoint: Path) -> dict[str, torch.Tensor]:
    """The backbone state dict (timm names) inside the tiny MOCA checkpoint."""
    model = read_checkpoint(tiny_checkpoint)["model"]
    prefix = "encoder_teacher."
    return {k.removeprefix(prefix): v for k, v in model.items() if k.startswith(prefix)}


def _save(obj: object) -> Callable[[Path, Path], Path]:
    def build(tmp: Path, ckpt: Path) -> Path:
        path = tmp / "bad.pth"
        torch.save(obj(ckpt) if callable(obj) else obj, path)
        return path
    return build


def _write_bytes(name: str, data: Callable[[Path], bytes]) -> Callable[[Path, Path], Path]:
    def build(tmp: Path, ckpt: Path) -> Path:
        (tmp / name).write_bytes(data(ckpt))
        return tmp / name
    return build


def _truncated_safetensors(tmp: Path, ckpt: Path) -> Path:
    save_file(_teacher(ckpt), tmp / "whole.safetensors")
    data = (tmp / "whole.safetensors").read_bytes()
    (tmp / "bad.safetensors").write_bytes(data[: len(data) // 2])
    return tmp / "bad.safetensors"


def _resnet() -> dict[str, torch.Tensor]:
    return {"conv1.weight": torch.zeros(8, 3, 7, 7), "bn1.weight": torch.ones(8),
            "fc.weight": torch.zeros(10, 8)}


def _moca_with(extra: dict) -> Callable[[Path], dict]:
    def make(ckpt: Path) -> dict:
        full = dict(read_checkpoint(ckpt))
        full["model"] = {**full["model"], **extra}
        return full
    return make


def _without(key: str) -> Callable[[Path], dict]:
    return lambda ckpt: {k: v for k, v in _teacher(ckpt).items() if k != key}


def _replaced(key: str, value: torch.Tensor) -> Callable[[Path], dict]:
    return lambda ckpt: {**_teacher(ckpt), key: value}


@dataclass
class Case:
    build: Callable[[Path, Path], Path]
    error: type[Exception]
    match: str
    options: dict = field(default_factory=dict)  # load_backbone keyword arguments
    names_file: bool = True


NOT_READABLE = r"bad\.pth: not a readable PyTorch checkpoint"
MISMATCH = r"bad\.pth: backbone does not match the architecture: "
TINY = r"tiny-moca\.pth: "
TINY_KEYS = "top-level keys: model, epoch, scaler, args$"

CASES: dict[str, Case] = {
    "missing-path": Case(lambda tmp, ckpt: tmp / "nope.pth", CheckpointError,
                         r"nope\.pth: no such checkpoint file$"),
    "directory": Case(lambda tmp, ckpt: tmp, CheckpointError,
                      r": is a directory, expected a checkpoint file$"),
    "truncated": Case(
        _write_bytes("bad.pth", lambda ckpt: ckpt.read_bytes()[: ckpt.stat().st_size // 2]), CheckpointError,
        NOT_READABLE + r" \(truncated or corrupt\?\): PytorchStreamReader failed reading zip archive: "
        r"failed finding central directory\.$"),
    "empty-file": Case(_write_bytes("bad.pth", lambda ckpt: b""), CheckpointError,
                       NOT_READABLE + r" \(truncated or corrupt\?\): EOFError$"),
    "git-lfs-pointer": Case(
        _write_bytes("bad.pth", lambda ckpt: b"version https://git-lfs.github.com/spec/v1\nsize 12\n"),
        CheckpointError, NOT_READABLE + r" \(corrupt, or not a checkpoint\?\): the safe unpickler "
        r"\(weights_only=True\) refused it: Unsupported operand 118$"),
    "plain-text": Case(_write_bytes("bad.pth", lambda ckpt: b"hello world\n"), CheckpointError,
                       NOT_READABLE + r" .*: neither a zip archive nor a complete pickle$"),
    "truncated-safetensors": Case(_truncated_safetensors, CheckpointError,
                                  r"bad\.safetensors: not a readable safetensors file: "),
    "top-level-list": Case(_save([1, 2]), CheckpointError,
                           r"bad\.pth: expected a dict of tensors at the top level, found list$"),
    "unknown-layout": Case(
        _save(lambda ckpt: {"weights": _teacher(ckpt), "epoch": 3}), CheckpointError,
        r"bad\.pth: unknown checkpoint layout; top-level keys: weights, epoch; "
        rf"known layouts: {KNOWN_LAYOUTS} \(use --checkpoint-key KEY"),
    "empty-dict": Case(_save({}), CheckpointError,
                       r"bad\.pth: unknown checkpoint layout; top-level keys: \(none\);"),
    "non-vit-state-dict": Case(
        _save(lambda ckpt: _resnet()), CheckpointError,
        r"bad\.pth: unknown checkpoint layout; top-level keys: conv1\.weight, bn1\.weight, fc\.weight; "
        r"known layouts: moca-full, "),
    "non-vit-under-key": Case(
        _save(lambda ckpt: {"state_dict": _resnet()}), CheckpointError,
        r"bad\.pth: not a ViT backbone: no patch_embed\.proj\.weight, cls_token, pos_embed "
        r"\(keys: conv1\.weight, bn1\.weight, fc\.weight \.\.\.\)$", {"checkpoint_key": "state_dict"}),
    "missing-pos-embed": Case(_save(_without("pos_embed")), CheckpointError,
                              r"bad\.pth: not a ViT backbone: no pos_embed \(keys: "),
    "missing-key": Case(_save(_without("blocks.0.attn.proj.weight")), CheckpointError,
                        MISMATCH + r"missing 1 backbone key\(s\): blocks\.0\.attn\.proj\.weight$"),
    "unexpected-key": Case(_save(_replaced("blocks.0.attn.gate", torch.zeros(3))), CheckpointError,
                           MISMATCH + r"unexpected 1 key\(s\): blocks\.0\.attn\.gate$"),
    "wrong-shape": Case(
        _save(_replaced("blocks.0.attn.proj.weight", torch.zeros(32, 16))), CheckpointError,
        MISMATCH + r"wrong shapes \(file vs model\): blocks\.0\.attn\.proj\.weight "
        r"\(32, 16\) vs \(32, 32\)$"),
    "stray-training-key": Case(
        _save(_moca_with({"projector.weight": torch.zeros(2, 2)})), CheckpointError,
        r"bad\.pth: 1 key\(s\) are neither under 'encoder_teacher\.' nor a known non-backbone part: "
        r"projector\.weight$"),
    "arch-mismatch": Case(
        lambda tmp, ckpt: ckpt, CheckpointError,
        TINY + r"--arch vit_small expects width 384 and depth 12, the checkpoint has width 32 and depth 1$",
        {"arch": "vit_small"}),
    "unknown-arch": Case(lambda tmp, ckpt: ckpt, ConfigError,
                         r"^unknown --arch 'vit_huge'; known: vit_tiny, ", {"arch": "vit_huge"},
                         names_file=False),
    "student-without-student": Case(_save(_teacher), ConfigError,
                                    r"bad\.pth: --student given, but a bare checkpoint has no student$",
                                    {"student": True}),
    "msn-student-without-encoder": Case(
        _save(lambda ckpt: {"target_encoder": _teacher(ckpt)}), CheckpointError,
        r"bad\.pth: msn checkpoint has no 'encoder' entry$", {"student": True}),
    "missing-checkpoint-key": Case(lambda tmp, ckpt: ckpt, CheckpointError,
                                   TINY + r"no state dict under key 'ema'; " + TINY_KEYS,
                                   {"checkpoint_key": "ema"}),
    "student-with-checkpoint-key": Case(
        lambda tmp, ckpt: ckpt, ConfigError, r"^--student cannot be combined with --checkpoint-key",
        {"checkpoint_key": "model", "student": True}, names_file=False),
    "format-does-not-fit": Case(
        lambda tmp, ckpt: ckpt, CheckpointError,
        TINY + r"--format dino-full does not fit this checkpoint \(DINO training checkpoint .*\); "
        + TINY_KEYS,
        {"fmt": "dino-full"}),
    "unknown-format": Case(lambda tmp, ckpt: ckpt, ConfigError,
                           r"^unknown --format 'dino3'; known: moca-full, ", {"fmt": "dino3"},
                           names_file=False),
}

CLI_FLAGS = {"arch": "--arch", "checkpoint_key": "--checkpoint-key", "fmt": "--format"}


def _cli_options(options: dict) -> list[str]:
    args = ["--student"] if options.get("student") else []
    for key, flag in CLI_FLAGS.items():
        if key in options:
            args += [flag, options[key]]
    return args


def _knn_args(ckpt: Path, data: Path, tmp: Path) -> list[str]:
    return ["knn", "--ckpt", str(ckpt), "--data", str(data), "--img-size", "32", "--k", "5",
            "--device", "cpu", "--num-workers", "0", "--batch-size", "8", "--cache-dir", str(tmp / "cache"),
            "--output", str(tmp / "out" / "knn.json")]


def _single_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moca-eval: error: ")
    return lines[0].removeprefix("moca-eval: error: ")


def test_the_valid_tiny_checkpoint_loads(tiny_checkpoint: Path) -> None:
    """Control for the cases below: without the defect the same file loads."""
    backbone = load_backbone(tiny_checkpoint, img_size=32)
    assert (backbone.format, backbone.arch.embed_dim, backbone.arch.depth) == ("moca-full", 32, 1)


@pytest.mark.parametrize("name", list(CASES))
def test_load_backbone_bad_checkpoint_raises_one_line_naming_file(name: str, tmp_path: Path,
                                                                   tiny_checkpoint: Path) -> None:
    case = CASES[name]
    path = case.build(tmp_path, tiny_checkpoint)
    with pytest.raises(case.error, match=case.match) as info:
        load_backbone(path, img_size=32, **case.options)
    message = str(info.value)
    assert "\n" not in message
    if case.names_file:
        assert message.startswith(f"{path}: ")


@pytest.mark.parametrize("name", list(CASES))
def test_cli_bad_checkpoint_exits_2_with_one_line_and_writes_nothing(
    name: str, tmp_path: Path, tiny_checkpoint: Path, tiny_demo_data: Path, capsys: pytest.CaptureFixture
) -> None:
    case = CASES[name]
    path = case.build(tmp_path, tiny_checkpoint)
    before = set(tmp_path.iterdir())

    code = main([*_knn_args(path, tiny_demo_data, tmp_path), *_cli_options(case.options)])

    assert code == 2
    message = _single_error_line(capsys.readouterr().err)
    assert re.search(case.match, message), message
    if case.names_file:
        assert message.startswith(f"{path}: ")
    assert set(tmp_path.iterdir()) == before  # no output folder, file or temp file, no cache


class _CreatesFile:
    """A pickle payload: unpickling it calls ``open(target, 'w')``, which creates ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _malicious_files(tmp: Path, marker: Path) -> dict[str, Path]:
    payload = {"model": _CreatesFile(marker)}
    torch.save(payload, tmp / "evil-zip.pth")
    (tmp / "evil-raw.pth").write_bytes(pickle.dumps(payload, protocol=2))
    return {"zip": tmp / "evil-zip.pth", "raw": tmp / "evil-raw.pth"}


def _plain_unpickle(path: Path) -> object:
    """What a full (unsafe) unpickler would do with the file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    else:
        data = path.read_bytes()
    return pickle.load(io.BytesIO(data))


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_malicious_payload_runs_under_a_plain_unpickler(kind: str, tmp_path: Path) -> None:
    """Control: the payload used below really creates its file when unpickled unsafely."""
    marker = tmp_path / "pwned"
    path = _malicious_files(tmp_path, tmp_path / "pwned")[kind]
    assert not marker.exists()
    _plain_unpickle(path)["model"].close()
    assert marker.exists()


@pytest.mark.parametrize("kind", ["zip", "raw"])
def test_malicious_pickle_is_refused_and_no_code_runs(kind: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _malicious_files(tmp_path, marker)[kind]
    refused = r": refusing to unpickle io\.open: loading it would run code from the file \(only tensors, "
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}{refused}"):
        load_backbone(path)
    assert not marker.exists()


def test_cli_malicious_pickle_exits_2_refuses_and_runs_nothing(
    tmp_path: Path, tiny_demo_data: Path, capsys: pytest.CaptureFixture
) -> None:
    marker = tmp_path / "pwned"
    path = _malicious_files(tmp_path, marker)["zip"]

    code = main(_knn_args(path, tiny_demo_data, tmp_path))

    assert code == 2
    message = _single_error_line(capsys.readouterr().err)
    assert message.startswith(f"{path}: refusing to unpickle io.open")
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


def test_cli_failure_keeps_an_existing_output_file(
    tmp_path: Path, tiny_demo_data: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out" / "knn.json"
    out.parent.mkdir()
    old = '{"schema_version": 1, "protocol": "knn", "old": true}\n'  # an earlier knn record
    out.write_text(old)

    code = main(_knn_args(tmp_path / "missing.pth", tiny_demo_data, tmp_path))

    assert code == 2
    message = _single_error_line(capsys.readouterr().err)
    assert message == f"{tmp_path / 'missing.pth'}: no such checkpoint file"
    assert out.read_text() == old
    assert [p.name for p in out.parent.iterdir()] == ["knn.json"]


def test_truncated_real_training_checkpoint_is_a_clear_error(shared_fixtures: Path, tmp_path: Path) -> None:
    data = (shared_fixtures / "MOCA" / "checkpoint-last.pth").read_bytes()
    path = tmp_path / "checkpoint-last.pth"
    path.write_bytes(data[: len(data) * 9 // 10])
    expected = r": not a readable PyTorch checkpoint \(truncated or corrupt\?\): PytorchStreamReader failed"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}{expected}"):
        load_backbone(path)
