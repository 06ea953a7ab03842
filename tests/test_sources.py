"""Checkpoint sources: hf-hub names from a hub cache the test builds (offline), in-memory modules,
and the Python API's evaluate on each (the same numbers as the plain file)."""

from __future__ import annotations

from pathlib import Path

import pytest
from layouts import random_vit
from safetensors.torch import save_file

import moca_eval
from moca_eval.checkpoint_io import sha256_file
from moca_eval.errors import CheckpointError, ConfigError
from moca_eval.sources import resolve

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture()
def hub_cache(tmp_path: Path, tiny_arch, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``models--org--tiny-vit`` in the hub cache layout (refs/main -> snapshots/<commit>/file)."""
    repo = tmp_path / "hub" / "models--org--tiny-vit"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file(random_vit(tiny_arch, 3).state_dict(), str(snapshot / "model.safetensors"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot / "model.safetensors"


def test_hf_hub_name_resolves_from_the_local_cache_offline(hub_cache: Path) -> None:
    source = resolve("hf-hub:org/tiny-vit")
    assert source.path.resolve() == hub_cache.resolve()
    assert (source.kind, source.revision, source.label) == ("hf-hub", COMMIT, "org_tiny-vit")
    assert resolve(f"hf-hub:org/tiny-vit@{COMMIT}").path.resolve() == hub_cache.resolve()


def test_hf_hub_name_not_cached_offline_is_one_line(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError, match=r"^hf-hub:org/missing: no model.safetensors or "
                       r"pytorch_model.bin in the local hub cache \(HF_HUB_OFFLINE is set\)$"):
        resolve("hf-hub:org/missing")


def test_evaluate_hub_file_and_module_give_the_same_record_numbers(
        hub_cache: Path, tiny_demo_data: Path, tiny_arch, tmp_path: Path) -> None:
    common = dict(ks=(5,), img_size=32, batch_size=32, num_workers=0, cache_dir=tmp_path / "cache",
                  family="dino")
    from_hub = moca_eval.evaluate("hf-hub:org/tiny-vit", "knn", tiny_demo_data, **common)
    from_file = moca_eval.evaluate(hub_cache, "knn", tiny_demo_data, **common)
    from_module = moca_eval.evaluate(random_vit(tiny_arch, 3), "knn", tiny_demo_data, **common)
    ckpt = from_hub.checkpoint
    assert ckpt["revision"] == COMMIT and ckpt["source"] == "hf-hub:org/tiny-vit"
    assert ckpt["sha256"] == sha256_file(hub_cache) and ckpt["source_kind"] == "hf-hub"
    assert from_module.checkpoint["source_kind"] == "module"
    assert from_hub.metrics["rows"] == from_file.metrics["rows"] == from_module.metrics["rows"]
    assert from_hub.headline == from_file.metrics["headline"]["value"]
    from moca_eval.reporting import build_table

    table = build_table([(Path("hub.json"), from_hub.to_dict())])
    assert [r.label for r in table.rows] == ["hf-hub:org/tiny-vit"]


def test_evaluate_unknown_setting_names_close_match(tiny_demo_data: Path, tiny_checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match=r"knn: unknown setting 'k' \(close: ks"):
        moca_eval.evaluate(tiny_checkpoint, "knn", tiny_demo_data, k=(5,))


def test_timm_name_resolves_to_its_hub_repository_in_the_cache(hub_cache: Path) -> None:
    repo = hub_cache.parents[2].parent / "models--timm--vit_base_patch16_224.dino"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "snapshots" / COMMIT).mkdir(parents=True)
    (repo / "snapshots" / COMMIT / "model.safetensors").write_bytes(hub_cache.read_bytes())
    source = resolve("timm:vit_base_patch16_224.dino")
    assert (source.kind, source.revision) == ("timm", COMMIT)
    assert source.path.name == "model.safetensors" and "vit_base_patch16_224.dino" in str(source.path)
    with pytest.raises(CheckpointError, match=r"^timm:vit_base_patch16_224.nope: no pretrained weights"):
        resolve("timm:vit_base_patch16_224.nope")


def test_single_protocol_command_takes_a_hub_name(hub_cache: Path, tiny_demo_data: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """``moca-eval knn --ckpt hf-hub:...`` loads the cached file: the same numbers as the file."""
    import json

    from moca_eval.cli import main

    args = ["knn", "--data", str(tiny_demo_data), "--k", "5", "--img-size", "32", "--batch-size", "32",
            "--num-workers", "0", "--cache-dir", str(tmp_path / "cache"), "--family", "dino"]
    assert main([*args, "--ckpt", "hf-hub:org/tiny-vit", "--output", str(tmp_path / "hub.json")]) == 0
    assert main([*args, "--ckpt", str(hub_cache), "--output", str(tmp_path / "file.json")]) == 0
    from_hub, from_file = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("hub", "file"))
    assert from_hub["checkpoint"]["sha256"] == sha256_file(hub_cache)
    origin = from_hub["checkpoint"]["source"], from_hub["checkpoint"]["revision"]
    assert origin == ("hf-hub:org/tiny-vit", COMMIT)
    assert from_hub["metrics"]["rows"] == from_file["metrics"]["rows"]
    capsys.readouterr()
    assert main([*args, "--ckpt", "hf-hub:org/missing"]) == 2
    assert "hf-hub:org/missing: no model.safetensors" in capsys.readouterr().err
