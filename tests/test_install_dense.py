"""The dense-stack installer's pieces, and the stack it installed (mmcv-lite or mmcv, mmdet, mmseg)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from moca_eval import install_dense as inst
from moca_eval import mm_ops


def fake_wheel(path: Path, names: list[str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name in names:
            zf.writestr(name, b"")
    return path


def test_cxx_standard_flags_are_raised_to_cxx20(tmp_path):
    setup = tmp_path / "setup.py"
    setup.write_text("a = ['-std=c++14']\nb = '-std=c++17 -O3'\nc = '-std=c++20'\n")
    assert inst.patch_cxx_standard(setup) == 2
    assert setup.read_text() == "a = ['-std=c++20']\nb = '-std=c++20 -O3'\nc = '-std=c++20'\n"


def test_a_wheel_without_compiled_ops_is_never_taken_from_the_cache(tmp_path):
    """An isolated build ships mmcv without mmcv/_ext: such a wheel must not count as built."""
    no_ops = fake_wheel(tmp_path / "mmcv-2.1.0-cp311-cp311-linux_x86_64.whl", ["mmcv/__init__.py"])
    assert not inst.has_ops(no_ops) and inst.cached_wheel(tmp_path) is None
    fake_wheel(no_ops, ["mmcv/__init__.py", "mmcv/_ext.cpython-311-x86_64-linux-gnu.so"])
    assert inst.has_ops(no_ops) and inst.cached_wheel(tmp_path) == no_ops
    assert inst.cached_wheel(tmp_path / "absent") is None


def test_cache_key_names_mmcv_torch_ops_python_and_machine(monkeypatch, tmp_path):
    import torch

    monkeypatch.setenv("MOCA_EVAL_WHEEL_CACHE", str(tmp_path))
    key = inst.build_key()
    assert key.startswith(f"mmcv-{inst.MMCV_VERSION}-torch-{torch.__version__.replace('+', '_')}-")
    assert ("-cpu-" in key) != torch.cuda.is_available() and inst.wheel_cache_root() == tmp_path


def test_the_dense_extra_is_read_from_the_installed_metadata():
    reqs = inst.dense_requirements()
    assert "mmdet==3.3.0" in reqs and "mmsegmentation==1.2.2" in reqs and {"ftfy", "regex"} <= set(reqs)


def test_the_installed_stack_has_mmcv_2_1_with_ops_accepted_by_mmdet_and_mmseg():
    mm_ops.install()  # as moca_eval.detection/segmentation do: mmcv-lite finds moca-eval's mmcv._ext
    import mmcv
    import mmdet  # asserts a compatible mmcv on import (mmdet 3.3.0 refuses >= 2.2.0)
    import mmseg
    import torch
    from mmcv.ops import nms
    from mmengine.utils.package_utils import is_installed

    assert mmcv.__version__ == inst.MMCV_VERSION and mmdet.__version__ == "3.3.0"
    assert mmseg.__version__ == "1.2.2"
    assert is_installed("mmdet")  # mmengine needs pkg_resources (setuptools < 81) to resolve configs
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 10, 10], [20, 20, 30, 30]])
    kept, order = nms(boxes, torch.tensor([0.9, 0.8, 0.7]), iou_threshold=0.5)  # an op of mmcv._ext
    assert order.tolist() == [0, 2]


@pytest.fixture()
def pip_calls(monkeypatch) -> list[tuple[str, ...]]:
    calls: list[tuple[str, ...]] = []
    monkeypatch.setattr(inst, "_pip", lambda *args, env=None: calls.append(args))
    monkeypatch.setattr(inst, "check_stack", lambda: None)
    monkeypatch.setattr(inst, "dense_requirements", lambda: ["mmcv-lite==2.1.0", "mmdet==3.3.0"])
    return calls


def test_the_default_install_is_the_dense_extra_with_nothing_built(pip_calls, monkeypatch):
    monkeypatch.setattr(inst, "build_mmcv_wheel", lambda dest: pytest.fail("built mmcv"))
    assert inst.install() is None
    assert pip_calls == [("install", "-q", "mmcv-lite==2.1.0", "mmdet==3.3.0")]


def test_compile_replaces_mmcv_lite_by_the_cached_compiled_wheel(pip_calls, monkeypatch, tmp_path):
    wheel = tmp_path / "mmcv-2.1.0-cp311-cp311-linux_x86_64.whl"
    monkeypatch.setattr(inst, "cached_wheel", lambda dest: wheel)
    assert inst.install(compiled=True) == wheel
    assert pip_calls == [("install", "-q", "mmdet==3.3.0"), ("uninstall", "-q", "-y", "mmcv-lite"),
                         ("install", "-q", "--force-reinstall", "--no-deps", str(wheel))]


def test_rebuild_without_compile_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        inst.main(["--rebuild"])
    assert exit_info.value.code == 2 and "--rebuild needs --compile" in capsys.readouterr().err
