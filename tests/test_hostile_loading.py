"""Issue 16, checkpoint loading: hostile and malformed checkpoints are refused with one line
naming the file and the problem (exit 2), before any model is built, and no file is touched."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile import fails_with_one_line, knn_args, teacher
from layouts import SMALL, layout_checkpoint, random_vit
from safetensors.torch import save_file

from moca_eval import checkpoints
from moca_eval.checkpoints import load_backbone
from moca_eval.cli import main
from moca_eval.errors import CheckpointError
from moca_eval.models import ArchSpec, build_vit


@pytest.fixture()
def real_builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The default device of every ``build_vit`` call the loader makes (``meta`` costs nothing)."""
    devices: list[str] = []

    def recording(spec: ArchSpec, **kwargs: object) -> torch.nn.Module:
        devices.append(torch.get_default_device().type)
        return build_vit(spec, **kwargs)

    monkeypatch.setattr(checkpoints, "build_vit", recording)
    return devices


def _cli_refuses(path: Path, data: Path, tmp: Path, capsys: pytest.CaptureFixture, *extra: str) -> str:
    """The knn CLI on ``path``: exit 2, one line starting with the path; nothing written."""
    message = fails_with_one_line(knn_args(path, data, tmp, *extra), capsys, intact=(path, data))
    assert message.startswith(f"{path}: "), message
    assert not (tmp / "out").exists() and not (tmp / "cache").exists()
    return message.removeprefix(f"{path}: ")


def test_item01_extra_block_key_rejected_before_build(tiny_checkpoint, tiny_demo_data, tmp_path, capsys,
                                                      real_builds) -> None:
    path = tmp_path / "extra-block.pth"
    torch.save({**teacher(tiny_checkpoint), "blocks.100000.norm1.weight": torch.ones(32)}, path)
    message = _cli_refuses(path, tiny_demo_data, tmp_path, capsys)
    assert message == ("block indices have a gap: blocks.100000.norm1.weight follows blocks.0 (the depth "
                       "is read from consecutive indices blocks.0, blocks.1, ...; a stray key?)")
    assert real_builds == []  # not even a meta model of 100001 blocks


def test_item01_depth_from_contiguous_block_indices_only(tiny_checkpoint, tmp_path, real_builds) -> None:
    sd = teacher(tiny_checkpoint)
    sd.update({k.replace("blocks.0.", "blocks.2."): v for k, v in sd.items() if k.startswith("blocks.0.")})
    torch.save(sd, tmp_path / "gap.pth")
    with pytest.raises(CheckpointError, match=r"gap\.pth: block indices have a gap: blocks\.2\.\S+ "
                       r"follows blocks\.0 "):
        load_backbone(tmp_path / "gap.pth", img_size=32)
    assert real_builds == []


def test_item01_stride0_pos_embed_rejected_before_build(tiny_checkpoint, tiny_demo_data, tmp_path, capsys,
                                                        real_builds) -> None:
    rows = 4_000_001  # 1 + 2000^2: a plausible square grid, 4M x 32 floats claimed, 128 bytes stored
    huge = torch.zeros(1, 1, 32).expand(1, rows, 32)
    path = tmp_path / "stride0.pth"
    torch.save({**teacher(tiny_checkpoint), "pos_embed": huge}, path)
    assert path.stat().st_size < 200_000
    message = _cli_refuses(path, tiny_demo_data, tmp_path, capsys)
    assert message == (f"pos_embed claims shape (1, {rows}, 32) but stores only 32 element(s) (a stride-0 "
                       "or overlapping view; save tensor.contiguous())")
    assert real_builds == []


def test_item01_key_set_and_shapes_checked_on_a_meta_model(tiny_checkpoint, tiny_demo_data, tmp_path,
                                                           capsys, real_builds) -> None:
    sd = teacher(tiny_checkpoint)
    path = tmp_path / "wrong.pth"
    torch.save({**sd, "blocks.0.mlp.fc2.weight": torch.zeros(32, 7), "blocks.0.attn.gate": torch.ones(3)},
               path)
    message = _cli_refuses(path, tiny_demo_data, tmp_path, capsys)
    assert message == ("backbone does not match the architecture: unexpected 1 key(s): blocks.0.attn.gate; "
                       "wrong shapes (file vs model): blocks.0.mlp.fc2.weight (32, 7) vs (32, 128)")
    assert "cpu" not in real_builds  # at most the (cached) meta model


def test_item05_nan_weights_refused_at_load(tiny_checkpoint, tiny_demo_data, tmp_path, capsys) -> None:
    sd = teacher(tiny_checkpoint)
    sd["blocks.0.norm1.weight"][3] = float("nan")
    sd["pos_embed"][0, 2, 1] = float("inf")
    path = tmp_path / "nan.pth"
    torch.save(sd, path)
    message = _cli_refuses(path, tiny_demo_data, tmp_path, capsys)
    assert message == ("2 tensor(s) hold NaN or inf values: pos_embed, blocks.0.norm1.weight (the features "
                       "would be meaningless; --allow-nonfinite evaluates anyway)")


def test_item05_allow_nonfinite_evaluates_and_reports(tiny_checkpoint, tmp_path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    sd = teacher(tiny_checkpoint)
    sd["blocks.0.norm1.weight"][3] = float("nan")
    torch.save(sd, tmp_path / "nan.pth")
    with caplog.at_level(logging.WARNING, logger="moca_eval.checkpoints"):
        backbone = load_backbone(tmp_path / "nan.pth", img_size=32, allow_nonfinite=True)
    assert backbone.nonfinite == ("blocks.0.norm1.weight",)
    assert f"{tmp_path / 'nan.pth'}: 1 tensor(s) hold NaN or inf values (--allow-nonfinite): " \
           "blocks.0.norm1.weight" in caplog.text
    assert torch.isnan(backbone.model.blocks[0].norm1.weight[3])


@pytest.mark.parametrize("values", [["nan"], ["0"], ["-0.07"], ["0.07", "inf"]])
def test_item05_nan_or_nonpositive_temperature_rejected(values, tiny_checkpoint, tiny_demo_data, tmp_path,
                                                        capsys) -> None:
    argv = knn_args(tiny_checkpoint, tiny_demo_data, tmp_path, "--temperature", *values)
    intact = (tiny_checkpoint, tiny_demo_data)
    assert fails_with_one_line(argv, capsys, intact=intact) == "k values must be >= 1 and temperatures > 0"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "0", "-1", "inf"])
def test_item05_nan_or_nonpositive_lambda_rejected(value, tiny_checkpoint, tiny_demo_data, tmp_path,
                                                   capsys) -> None:
    argv = ["lowshot", "--ckpt", str(tiny_checkpoint), "--data", str(tiny_demo_data), "--img-size", "32",
            "--device", "cpu", "--num-workers", "0", "--lambd", "0.1", value,
            "--output", str(tmp_path / "out.json")]
    message = fails_with_one_line(argv, capsys)
    assert message == f"--lambd values must be positive and finite, got [0.1, {float(value)}]"
    assert not (tmp_path / "out.json").exists()


def _legacy_truncated(size: int) -> Callable[[Path, dict], Path]:
    def build(tmp: Path, sd: dict) -> Path:
        whole = tmp / "whole.pth"
        torch.save({"model": sd, "args": {"lr": 1.0}}, whole, _use_new_zipfile_serialization=False)
        (tmp / "bad.pth").write_bytes(whole.read_bytes()[:size])
        return tmp / "bad.pth"
    return build


def _saved(change: Callable[[dict], dict]) -> Callable[[Path, dict], Path]:
    def build(tmp: Path, sd: dict) -> Path:
        torch.save(change(sd), tmp / "bad.pth")
        return tmp / "bad.pth"
    return build


def _width_100(tmp: Path, sd: dict) -> Path:
    torch.save(random_vit(ArchSpec(embed_dim=100, depth=1, num_heads=4, patch_size=8, img_size=32),
                          0).state_dict(), tmp / "bad.pth")
    return tmp / "bad.pth"


ITEM08_CHECKPOINTS = {
    "width-100": (_width_100, "width 100 is not divisible by the 3 heads the default rule gives; pass "
                  "--num-heads N (a divisor of 100: 1, 2, 4, 5, 10, 20, 25, 50 ...)"),
    "int-keys": (_saved(lambda sd: {**sd, 7: torch.zeros(1)}), "key 7 (int) is not a string parameter name"),
    "non-tensor-value": (_saved(lambda sd: {**sd, "blocks.0.norm1.weight": [1.0] * 32}),
                         "blocks.0.norm1.weight is a list, expected a tensor"),
    "0-d-weight": (_saved(lambda sd: {**sd, "patch_embed.proj.weight": torch.tensor(1.0)}),
                   "patch_embed.proj.weight is a 0-d scalar, expected a weight tensor with a shape"),
    "empty-pos-embed": (_saved(lambda sd: {**sd, "pos_embed": torch.zeros(1, 0, 32)}),
                        "pos_embed has shape (1, 0, 32), expected a non-empty 3-d tensor"),
    "sparse-tensor": (_saved(lambda sd: {**sd, "blocks.0.norm1.weight": torch.ones(32).to_sparse()}),
                      "blocks.0.norm1.weight is a torch.sparse_coo tensor, expected a dense one (save "
                      "tensor.to_dense())"),
    "integer-weights": (_saved(lambda sd: {**sd, "cls_token": torch.zeros(1, 1, 32, dtype=torch.long)}),
                        "cls_token has dtype torch.int64, expected floating-point weights"),
    "1-channel-patch-embedding": (
        _saved(lambda sd: {**sd, "patch_embed.proj.weight": sd["patch_embed.proj.weight"][:, :1].clone()}),
        "patch_embed.proj.weight takes 1 input channel(s); moca-eval feeds RGB images (3 channels)"),
    "legacy-truncated-at-500-bytes": (_legacy_truncated(500), "not a readable PyTorch checkpoint (truncated "
                                      "or corrupt?): neither a zip archive nor a complete pickle"),
    "legacy-truncated-at-28-bytes": (_legacy_truncated(28), "not a readable PyTorch checkpoint (truncated or "
                                     "corrupt?): unpack requires a buffer of 4 bytes"),
}


@pytest.mark.parametrize("name", list(ITEM08_CHECKPOINTS))
def test_item08_malformed_checkpoint_is_one_line_exit_2(name, tiny_checkpoint, tiny_demo_data, tmp_path,
                                                         capsys, real_builds) -> None:
    build, expected = ITEM08_CHECKPOINTS[name]
    path = build(tmp_path, teacher(tiny_checkpoint))
    assert _cli_refuses(path, tiny_demo_data, tmp_path, capsys) == expected
    assert "cpu" not in real_builds  # found at load, before a model exists (not during extraction)


def test_item08_width_100_loads_with_the_suggested_num_heads(tmp_path) -> None:
    path = _width_100(tmp_path, {})
    backbone = load_backbone(path, img_size=32, num_heads=4)
    assert (backbone.arch.embed_dim, backbone.arch.num_heads) == (100, 4)


def test_item08_feature_cls_last0_refused(tiny_checkpoint, tiny_demo_data, tmp_path, capsys) -> None:
    argv = knn_args(tiny_checkpoint, tiny_demo_data, tmp_path, "--feature", "cls-last0")
    assert fails_with_one_line(argv, capsys) == "feature cls-last0: cls-lastN needs N >= 1 blocks"
    assert not (tmp_path / "cache").exists()


class _System:
    """Unpickling calls ``os.system('touch <marker>')``: torch 2.14 calls its module blocked."""

    def __init__(self, marker: Path) -> None:
        self.command = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("container", ["zip", "raw"])
def test_item11_refused_pickle_global_is_named_in_one_line(protocol, container, tiny_demo_data, tmp_path,
                                                          capsys) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"model": _System(marker), "w": torch.zeros(2)}
    if container == "zip":
        torch.save(payload, path, pickle_protocol=protocol)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=protocol))
    message = _cli_refuses(path, tiny_demo_data, tmp_path, capsys)
    assert message == ("refusing to unpickle posix.system: loading it would run code from the file (only "
                       "tensors, containers, argparse.Namespace and numpy values are allowed)")
    assert not marker.exists()


def test_item11_det_eval_only_weights_refuses_the_global_in_one_line(tiny_checkpoint, tmp_path,
                                                                     capsys) -> None:
    pytest.importorskip("mmdet", reason="det needs the dense stack (pip install -e '.[dense]')")
    marker = tmp_path / "pwned"
    weights = tmp_path / "epoch_12.pth"
    torch.save({"state_dict": {}, "meta": _System(marker)}, weights)
    argv = ["det", "--ckpt", str(tiny_checkpoint), "--data", str(tmp_path / "coco"), "--eval-only",
            "--weights", str(weights), "--work-dir", str(tmp_path / "work")]
    message = fails_with_one_line(argv, capsys, intact=(weights, tiny_checkpoint))
    assert message == (f"{weights}: refusing to unpickle posix.system: loading it would run code from the "
                       "file (only tensors, containers, argparse.Namespace and numpy values are allowed)")
    assert "weights_only=False" not in message
    assert not marker.exists() and not (tmp_path / "work").exists()


def test_item18_cls_last99_on_a_2_block_model_refused(tmp_path, tiny_demo_data, capsys) -> None:
    path = tmp_path / "two-blocks.pth"
    torch.save(random_vit(SMALL, 0).state_dict(), path)
    argv = knn_args(path, tiny_demo_data, tmp_path, "--feature", "cls-last99")
    message = fails_with_one_line(argv, capsys)
    assert message == "feature cls-last99 needs the last 99 blocks; the checkpoint has 2"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()


_READ_AS_OTHER_USER = """
import sys
from moca_eval.checkpoints import load_backbone
from moca_eval.errors import CheckpointError
try:
    load_backbone(sys.argv[1])
except CheckpointError as err:
    print(err)
"""


def test_item18_unreadable_safetensors_reported_as_unreadable_not_missing(tiny_checkpoint) -> None:
    folder = Path(tempfile.mkdtemp(prefix="moca-unreadable-"))  # outside pytest's root-only tmp
    try:
        folder.chmod(0o755)
        path = folder / "teacher.safetensors"
        save_file(teacher(tiny_checkpoint), path)
        path.chmod(0o000)
        as_user = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"] if os.geteuid() == 0 else []
        out = subprocess.run([*as_user, sys.executable, "-c", _READ_AS_OTHER_USER, str(path)],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        assert out.strip() == f"{path}: cannot open the checkpoint (Permission denied)"
    finally:
        shutil.rmtree(folder)


def test_item20_dino_teacher_only_file_says_it_is_ambiguous(tmp_path) -> None:
    sd = random_vit(SMALL, 0).state_dict()
    path = tmp_path / "dino-teacher.pth"
    full, _ = layout_checkpoint("dino-full", sd, sd)
    torch.save({"teacher": full["teacher"]}, path)  # a DINO run's teacher, saved without the student

    assumed = load_backbone(path, img_size=32).family_choice
    chosen = load_backbone(path, img_size=32, family="dino").family_choice

    assert (assumed.family, assumed.source) == ("dinov2", "assumed")
    assert assumed.reason == ("layout dinov2-train is saved by dinov2, dino; assumed dinov2 (pass --family "
                              "dino or --family timm if it is dino)")
    assert (chosen.family, chosen.source) == ("dino", "--family")


def test_item20_the_cli_prints_the_assumption(tmp_path, tiny_demo_data, caplog) -> None:
    sd = random_vit(SMALL, 0).state_dict()
    full, _ = layout_checkpoint("dino-full", sd, sd)
    torch.save({"teacher": full["teacher"]}, tmp_path / "dino-teacher.pth")
    with caplog.at_level(logging.INFO, logger="moca_eval.families"):
        code = main(knn_args(tmp_path / "dino-teacher.pth", tiny_demo_data, tmp_path))
    assert code == 0
    assert "knn: family dinov2 (layout dinov2-train is saved by dinov2, dino; assumed dinov2 (pass " \
           "--family dino or --family timm if it is dino))" in caplog.text
