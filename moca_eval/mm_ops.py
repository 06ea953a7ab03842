"""``mmcv._ext`` for mmcv-lite: the compiled mmcv ops the seg/det protocols call, on torchvision.

mmcv-lite is mmcv without its compiled extension; every ``mmcv/ops/*.py`` wrapper loads
``mmcv._ext`` on import (``ext_loader.load_ext``) and checks each function name it will call.
``install()`` appends an import finder that answers ``mmcv._ext`` only when no compiled one is
found first, with a module holding:

- ``roi_align_forward`` / ``roi_align_backward``: mmcv's in-place signatures; average pooling on
  torchvision's RoIAlign kernels (CPU and CUDA; the same Caffe2/Detectron algorithm: ``aligned``
  half-pixel shift, ``sampling_ratio`` <= 0 adaptive, ``spatial_scale``), max pooling
  (``pool_mode`` 0: the largest bilinear sample of a bin, its coordinates in ``argmax_y/x``,
  the gradient to that sample's four pixels) in plain torch.
- ``nms``: torchvision's NMS with mmcv's ``offset`` (1: boxes span ``x2 - x1 + 1`` pixels).

Cascade Mask R-CNN calls these three, Segmenter none. Every other name resolves to a function
raising a one-line ``ConfigError`` that names the op and the compiled install,
``python -m moca_eval.install_dense --compile``.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import types

import torch

from moca_eval.errors import ConfigError

EXT_NAME = "mmcv._ext"
MAX_POOL, AVG_POOL = 0, 1


def nms(boxes: torch.Tensor, scores: torch.Tensor, *, iou_threshold: float, offset: int = 0
        ) -> torch.Tensor:
    """Indices kept, highest score first; IoU > ``iou_threshold`` suppresses (mmcv's ``nms``)."""
    from torchvision.ops import nms as tv_nms

    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    if offset:  # (x2 + offset) - x1 is mmcv's width; the intersection grows the same way
        boxes = torch.cat([boxes[:, :2], boxes[:, 2:4] + offset], dim=1)
    return tv_nms(boxes, scores, float(iou_threshold))


def _roi_geometry(rois: torch.Tensor, *, pooled: tuple[int, int], spatial_scale: float, sampling_ratio: int,
                  aligned: bool) -> tuple[torch.Tensor, ...]:
    """Per RoI: start (y, x), bin size (h, w) and sample grid (h, w), as mmcv's kernels compute them."""
    shift = 0.5 if aligned else 0.0
    scaled = rois[:, 1:5] * spatial_scale - shift
    start, end = scaled[:, [1, 0]], scaled[:, [3, 2]]
    size = end - start
    if not aligned:  # legacy mode: every RoI at least one pixel
        size = size.clamp(min=1.0)
    bins = size / size.new_tensor(pooled)
    if sampling_ratio > 0:
        grid = torch.full_like(size, sampling_ratio, dtype=torch.long)
    else:  # adaptive: ceil(bin size) samples per bin side, none for an empty (aligned) RoI
        grid = torch.ceil(bins).long().clamp(min=0)
    return start, bins, grid


def _sample_coords(start: torch.Tensor, bins: torch.Tensor, grid: int, pooled: int) -> torch.Tensor:
    """``[K, pooled, grid]`` sample positions ``start + p * bin + (i + 0.5) * bin / grid`` (mmcv's order
    of operations, so the same floats)."""
    p = torch.arange(pooled, device=start.device, dtype=start.dtype)[None, :, None]
    i = torch.arange(grid, device=start.device, dtype=start.dtype)[None, None, :] + 0.5
    bins = bins[:, None, None]
    return start[:, None, None] + p * bins + i * bins / grid


def _axis(coord: torch.Tensor, size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Low and high pixel index along one axis and their bilinear weights; both weights 0 outside
    ``[-1, size]``, coordinates clamped to the first and last pixel (mmcv's rules)."""
    inside = ((coord >= -1.0) & (coord <= size)).to(coord.dtype)
    c = coord.clamp(min=0.0)
    low = c.floor().long().clamp(max=size - 1)
    at_edge = low >= size - 1
    high = torch.where(at_edge, low, low + 1)
    frac = torch.where(at_edge, torch.zeros_like(c), c - low.to(c.dtype))
    return [low, high], [(1.0 - frac) * inside, frac * inside]


def _bilinear_terms(y: torch.Tensor, x: torch.Tensor, height: int, width: int):
    """The four (y index, x index, weight) of bilinear interpolation at ``(y, x)``, in mmcv's order."""
    (yi, wy), (xi, wx) = _axis(y, height), _axis(x, width)
    return [(yi[a], xi[b], wy[a] * wx[b]) for a in (0, 1) for b in (0, 1)]


def _max_pool(feats: torch.Tensor, rois: torch.Tensor, start: torch.Tensor, bins: torch.Tensor,
              grid: tuple[int, int], pooled: tuple[int, int]) -> tuple[torch.Tensor, ...]:
    """For RoIs sharing one sample grid: the largest bilinear sample of each bin ``[K, C, ph, pw]``
    (-10000 and coordinates -1 when no sample exceeds it, as in mmcv) and its y and x."""
    (gh, gw), (ph, pw) = grid, pooled
    k, c = rois.shape[0], feats.shape[1]
    none = feats.new_full((k, c, ph, pw), -1.0)
    if gh * gw == 0:  # no sample: mmcv's initial maximum, no position
        return feats.new_full((k, c, ph, pw), -1e4), none, none.clone()
    ys = _sample_coords(start[:, 0], bins[:, 0], gh, ph)[:, :, None, :, None].expand(k, ph, pw, gh, gw)
    xs = _sample_coords(start[:, 1], bins[:, 1], gw, pw)[:, None, :, None, :].expand(k, ph, pw, gh, gw)
    batch = rois[:, 0].long()[:, None, None, None, None]
    vals = 0
    for yi, xi, w in _bilinear_terms(ys, xs, feats.shape[2], feats.shape[3]):
        vals = vals + w[..., None] * feats[batch, :, yi, xi]  # [K, ph, pw, gh, gw, C]
    vals = vals.reshape(k, ph, pw, gh * gw, c).permute(0, 4, 1, 2, 3)
    best, arg = vals.max(dim=-1)  # the first of equal maxima, as mmcv's strict ">" keeps

    def pick(coords: torch.Tensor) -> torch.Tensor:
        return coords.reshape(k, 1, ph, pw, -1).expand(-1, c, -1, -1, -1).gather(-1, arg[..., None])[..., 0]

    found = best > -1e4
    return best.clamp(min=-1e4), torch.where(found, pick(ys), none), torch.where(found, pick(xs), none)


def roi_align_forward(input: torch.Tensor, rois: torch.Tensor, output: torch.Tensor, argmax_y: torch.Tensor,
                      argmax_x: torch.Tensor, *, aligned_height: int, aligned_width: int,
                      spatial_scale: float, sampling_ratio: int, pool_mode: int, aligned: bool) -> None:
    """mmcv's RoIAlign forward: fills ``output`` (and, max pooling, ``argmax_y/x``) in place."""
    pooled = (aligned_height, aligned_width)
    if rois.shape[0] == 0:
        return
    if pool_mode == AVG_POOL:
        from torchvision.ops import roi_align

        output.copy_(roi_align(input, rois, pooled, spatial_scale, sampling_ratio, aligned))
        return
    start, bins, grid = _roi_geometry(rois, pooled=pooled, spatial_scale=spatial_scale,
                                      sampling_ratio=sampling_ratio, aligned=aligned)
    for g in torch.unique(grid, dim=0).tolist():
        rows = (grid == grid.new_tensor(g)).all(dim=1).nonzero()[:, 0]
        best, y, x = _max_pool(input, rois[rows], start[rows], bins[rows], tuple(g), pooled)
        output[rows], argmax_y[rows], argmax_x[rows] = best, y, x


def roi_align_backward(grad_output: torch.Tensor, rois: torch.Tensor, argmax_y: torch.Tensor,
                       argmax_x: torch.Tensor, grad_input: torch.Tensor, *, aligned_height: int,
                       aligned_width: int, spatial_scale: float, sampling_ratio: int, pool_mode: int,
                       aligned: bool) -> None:
    """mmcv's RoIAlign backward: adds the input gradient into ``grad_input`` in place."""
    if rois.shape[0] == 0:
        return
    if pool_mode == AVG_POOL:
        n, c, h, w = grad_input.shape
        grad_input.add_(torch.ops.torchvision._roi_align_backward(
            grad_output, rois, spatial_scale, aligned_height, aligned_width, n, c, h, w, sampling_ratio,
            aligned))
        return
    k, c = grad_output.shape[:2]
    batch = rois[:, 0].long()[:, None, None, None].expand_as(grad_output)
    channel = torch.arange(c, device=grad_output.device)[None, :, None, None].expand_as(grad_output)
    found = (argmax_y != -1.0).to(grad_output.dtype)
    for yi, xi, weight in _bilinear_terms(argmax_y, argmax_x, grad_input.shape[2], grad_input.shape[3]):
        grad_input.index_put_((batch, channel, yi, xi), grad_output * weight * found, accumulate=True)


PROVIDED = {"roi_align_forward": roi_align_forward, "roi_align_backward": roi_align_backward, "nms": nms}


def _not_provided(name: str):
    def missing(*args, **kwargs):
        raise ConfigError(f"mmcv op {name} is not provided by moca-eval; install a compiled mmcv with "
                          "`python -m moca_eval.install_dense --compile`")

    missing.__name__ = name
    return missing


def ext_module() -> types.ModuleType:
    """The stand-in ``mmcv._ext``: the ``PROVIDED`` ops, any other public name a raising stub."""
    module = types.ModuleType(EXT_NAME, __doc__)
    module.__dict__.update(PROVIDED)

    def module_getattr(name: str):
        if name.startswith("_"):
            raise AttributeError(f"module {EXT_NAME!r} has no attribute {name!r}")
        return _not_provided(name)

    module.__getattr__ = module_getattr
    module.moca_eval_stand_in = True
    return module


class _ExtFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Last on ``sys.meta_path``: a compiled ``mmcv._ext`` is always found before it."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname == EXT_NAME else None

    def create_module(self, spec):
        return ext_module()

    def exec_module(self, module) -> None:
        pass


def install() -> None:
    """Let ``import mmcv._ext`` fall back to ``ext_module()`` (idempotent; imports nothing of mmcv)."""
    if not any(isinstance(finder, _ExtFinder) for finder in sys.meta_path):
        sys.meta_path.append(_ExtFinder())
