"""Result files: atomic JSON writes, provenance fields, the printed table."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime, timedelta
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from moca_eval.checkpoints import LoadedBackbone
from moca_eval.families import choose_family
from moca_eval.models import ArchSpec, build_vit
from moca_eval.record import checkpoint_block
from moca_eval.results import (
    atomic_path,
    format_table,
    git_commit,
    provenance,
    write_json_atomic,
)


def test_write_json_atomic_writes_indented_json_with_paths_and_arrays(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "dir" / "r.json"  # parents are created
    write_json_atomic(out, {"p": Path("/x/y"), "a": np.arange(3), "f": np.float32(0.5), "n": None})
    assert out.read_text() == ('{\n  "p": "/x/y",\n  "a": [\n    0,\n    1,\n    2\n  ],\n  "f": 0.5,\n'
                               '  "n": null\n}\n')
    assert os.listdir(out.parent) == ["r.json"]


def test_write_json_atomic_keeps_old_file_and_no_temp_when_serialisation_fails(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    write_json_atomic(out, {"top1": 71.5})
    with pytest.raises(TypeError, match="not JSON serialisable: object"):
        write_json_atomic(out, {"top1": 72.0, "bad": object()})
    assert json.loads(out.read_text()) == {"top1": 71.5}
    assert os.listdir(tmp_path) == ["r.json"]


def test_atomic_path_leaves_nothing_when_the_block_fails(tmp_path: Path) -> None:
    out = tmp_path / "features.npz"
    with pytest.raises(RuntimeError, match="interrupted"), atomic_path(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_atomic_write_gives_the_usual_file_mode_not_mkstemps_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "r.json", {})
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644


def test_format_table_exact_output() -> None:
    rows = [{"k": 10, "T": 0.07, "top1": 71.234, "note": "best"}, {"k": 200, "T": 0.1, "top1": 5.0}]
    assert format_table(rows, ["k", "T", "top1", "note"]) == (
        "  k     T   top1  note\n"
        "---  ----  -----  ----\n"
        " 10  0.07  71.23  best\n"
        "200  0.10   5.00      "
    )


def test_format_table_without_rows_is_header_only() -> None:
    assert format_table([], ["k", "top1"]) == "k  top1\n-  ----"


def test_provenance_has_versions_commit_host_device_time_and_extras() -> None:
    info = provenance(run="smoke")
    assert set(info) == {"moca_eval_commit", "packages", "python", "host", "device", "finished_utc", "run"}
    assert info["run"] == "smoke"
    for name in ("moca-eval", "torch", "timm", "numpy"):
        assert info["packages"][name] == metadata.version(name)
    assert info["python"] == platform.python_version()
    assert info["host"] == platform.node()
    finished = datetime.fromisoformat(info["finished_utc"])
    assert finished.utcoffset() == timedelta(0)
    assert info["moca_eval_commit"] is None or len(info["moca_eval_commit"]) == 40
    json.dumps(info)  # serialisable as is


def test_git_commit_is_none_when_git_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert git_commit() is None


def test_checkpoint_block_describes_the_loaded_checkpoint() -> None:
    arch = ArchSpec(embed_dim=32, depth=1, num_heads=2, patch_size=8, img_size=32)
    torch.manual_seed(0)
    choice = choose_family("model-wrapped", ("moca", "mae", "timm"))
    backbone = LoadedBackbone(model=build_vit(arch), format="model-wrapped", family="moca", arch=arch,
                              sha256="ab" * 32, path=Path("/ck/x.pth"), dropped=("decoder.a", "decoder.b"),
                              pos_embed="sincos", student=True, family_choice=choice)
    info = checkpoint_block(backbone)
    assert info == {
        "path": "/ck/x.pth", "sha256": "ab" * 32, "layout": "model-wrapped", "family": "moca",
        "family_source": "assumed", "family_reason": choice.reason, "student": True,
        "checkpoint_key": None, "arch": "vit(d=32,L=1,h=2)/8@32",
        "arch_spec": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8, "img_size": 32,
                      "mlp_ratio": 4.0, "qkv_bias": True, "init_values": None, "reg_tokens": 0,
                      "no_embed_class": False, "in_chans": 3},
        "pos_embed": "sincos", "dropped_keys": 2,
    }
    assert "assumed moca" in choice.reason and "--family mae" in choice.reason
