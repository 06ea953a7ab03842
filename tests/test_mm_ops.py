"""moca-eval's ``mmcv._ext`` (``moca_eval.mm_ops``) against compiled mmcv 2.1.0.

The reference outputs in ``fixtures/mmcv_ops_reference.pt`` were written once by
``fixtures/make_mmcv_reference.py`` with mmcv 2.1.0 compiled from source with its CPU ops
(``python -m moca_eval.install_dense --compile``, torch 2.14.1): mmcv's own ``roi_align``,
``nms`` and ``batched_nms`` wrappers on random inputs. Here the same wrappers run on
moca-eval's ops (patched in, so this also tests them where a compiled mmcv is installed).
"""

from __future__ import annotations

import importlib.machinery
import sys
from pathlib import Path

import pytest
import torch

from moca_eval import mm_ops
from moca_eval.errors import ConfigError

pytest.importorskip("mmcv", reason="the [dense] extra is not installed")
NO_GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, NO_GPU])]  # torchvision's CUDA kernels
REFERENCE = torch.load(Path(__file__).with_name("fixtures") / "mmcv_ops_reference.pt", weights_only=True)


@pytest.fixture()
def mmcv_ops_on_moca_eval(monkeypatch):
    """mmcv's RoIAlign and NMS wrappers, calling moca-eval's ops whatever ``mmcv._ext`` is installed."""
    mm_ops.install()
    import mmcv.ops

    ext = mm_ops.ext_module()
    for wrapper in ("mmcv.ops.roi_align", "mmcv.ops.nms"):  # the modules (their functions share the names)
        monkeypatch.setattr(sys.modules[wrapper], "ext_module", ext)
    return mmcv.ops


def case_id(case: dict) -> str:
    return (f"{case['pool_mode']}-aligned{int(case['aligned'])}-ratio{case['sampling_ratio']}"
            f"-scale{case['spatial_scale']}-rois{case['rois'].shape[0]}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", REFERENCE["roi_align"], ids=case_id)
def test_roi_align_forward_and_backward_equal_compiled_mmcv(case, device, mmcv_ops_on_moca_eval):
    x = REFERENCE["features"].to(device, copy=True).requires_grad_(True)
    out = mmcv_ops_on_moca_eval.roi_align(x, case["rois"].to(device), case["output_size"],
                                          case["spatial_scale"], case["sampling_ratio"], case["pool_mode"],
                                          case["aligned"])
    out.backward(case["grad_output"].to(device))
    assert out.shape == case["output"].shape
    torch.testing.assert_close(out.detach().cpu(), case["output"], atol=1e-5, rtol=0)
    torch.testing.assert_close(x.grad.cpu(), case["grad_input"], atol=1e-5, rtol=0)


def test_the_reference_covers_modes_ratios_and_empty_inputs():
    cases = REFERENCE["roi_align"]
    modes = {(c["pool_mode"], c["aligned"]) for c in cases}
    assert modes == {(m, a) for m in ("avg", "max") for a in (True, False)}
    assert {c["sampling_ratio"] for c in cases} == {0, 1, 2, 3}
    assert sum(c["rois"].shape[0] == 0 for c in cases) == 2 and REFERENCE["mmcv"] == "2.1.0"
    assert all(c["output"].abs().sum() > 0 for c in cases if c["rois"].shape[0])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", REFERENCE["nms"],
                         ids=lambda c: f"iou{c['iou_threshold']}-offset{c['offset']}")
def test_nms_and_batched_nms_keep_what_compiled_mmcv_keeps(case, device, mmcv_ops_on_moca_eval):
    boxes, scores = case["boxes"].to(device), case["scores"].to(device)
    dets, keep = mmcv_ops_on_moca_eval.nms(boxes, scores, case["iou_threshold"], offset=case["offset"])
    assert keep.tolist() == case["keep"].tolist() and 0 < len(keep) < len(boxes)
    torch.testing.assert_close(dets, torch.cat([boxes[keep], scores[keep, None]], dim=1))
    nms_cfg = {"iou_threshold": case["iou_threshold"], "offset": case["offset"]}
    _, batched = mmcv_ops_on_moca_eval.batched_nms(boxes, scores, case["labels"].to(device), nms_cfg)
    assert batched.tolist() == case["batched_keep"].tolist()


def test_nms_offset_one_counts_the_end_pixel():
    """Boxes x in [0, 9] and [5, 14], y in [0, 9]: IoU 36/126 with ``x2 - x1`` sizes, 50/150 with
    mmcv's offset 1 (one more pixel each way)."""
    boxes = torch.tensor([[0.0, 0, 9, 9], [5, 0, 14, 9]])
    scores = torch.tensor([0.9, 0.8])
    assert mm_ops.nms(boxes, scores, iou_threshold=0.3, offset=0).tolist() == [0, 1]
    assert mm_ops.nms(boxes, scores, iou_threshold=0.3, offset=1).tolist() == [0]
    assert mm_ops.nms(boxes[:0], scores[:0], iou_threshold=0.4).dtype == torch.long


def test_max_pool_bin_takes_its_largest_sample_and_sends_the_gradient_there():
    """One 1x1 bin over a 2x2 map, 2x2 samples at (0.25|0.75, 0.25|0.75) when aligned is off
    (RoI [0, 1] x [0, 1], no shift): bilinear values, the largest at (0.75, 0.75)."""
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    rois = torch.tensor([[0.0, 0, 0, 1, 1]])
    out, ay, ax = torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    kwargs = {"aligned_height": 1, "aligned_width": 1, "spatial_scale": 1.0, "sampling_ratio": 2,
              "pool_mode": mm_ops.MAX_POOL, "aligned": False}
    mm_ops.roi_align_forward(x, rois, out, ay, ax, **kwargs)
    assert out.item() == pytest.approx(1 + 0.75 * 1 + 0.75 * 2) and (ay.item(), ax.item()) == (0.75, 0.75)
    grad = torch.zeros_like(x)
    mm_ops.roi_align_backward(torch.ones(1, 1, 1, 1), rois, ay, ax, grad, **kwargs)
    torch.testing.assert_close(grad, torch.tensor([[[[0.0625, 0.1875], [0.1875, 0.5625]]]]))


def test_any_other_mmcv_op_raises_one_line_naming_it_and_the_compiled_install():
    ext = mm_ops.ext_module()
    with pytest.raises(ConfigError, match=r"^mmcv op deform_conv_forward is not provided by moca-eval; "
                                          r"install a compiled mmcv with `python -m moca_eval.install_dense "
                                          r"--compile`$"):
        ext.deform_conv_forward(torch.zeros(1))
    assert hasattr(ext, "nms_rotated") and not hasattr(ext, "__path__")  # a module, not a package


def test_the_stand_in_is_found_only_for_mmcv_ext_and_after_the_real_finders():
    mm_ops.install()
    mm_ops.install()
    finders = [f for f in sys.meta_path if isinstance(f, mm_ops._ExtFinder)]
    assert len(finders) == 1  # after the finder of installed files, which finds a compiled mmcv._ext
    assert sys.meta_path.index(finders[0]) > sys.meta_path.index(importlib.machinery.PathFinder)
    assert finders[0].find_spec("mmcv.other") is None and finders[0].find_spec("mmcv._ext") is not None
    import mmcv.ops  # noqa: F401  (every wrapper's load_ext check passes)

    ext = sys.modules["mmcv._ext"]
    assert getattr(ext, "moca_eval_stand_in", False) or ext.__file__.endswith((".so", ".pyd"))
