"""moca-eval parts registered in mmdet's registries (imported through the config's ``custom_imports``).

- ``MocaEvalViTDet``: the timm ViT returned by moca-eval's checkpoint loader (every layout it
  reads; ``moca_eval.mm_utils.build_dense_vit``) as a 4-level backbone, iBOT/BEiT style: the
  tokens after blocks 4, 6, 8 and 12 (1-based; ViT-L: 8, 12, 16, 24) as ``[B, D, H/16, W/16]``
  maps, then a multi-scale adapter to strides 4 (two 2x deconvolutions with norm and GELU
  between), 8 (one deconvolution), 16 (identity) and 32 (2x2 max-pool), D channels each, for
  an FPN. The norm is SyncBN as in iBOT's and BEiT's detection code (BN statistics over all
  GPUs' images; with 2 images per GPU plain BN would see only 2); ``run()`` swaps in BN on CPU.
- ``CocoAPMetric``: mmdet's ``CocoMetric`` that also reports when a model predicts nothing at
  all (mmdet then logs an error and returns no number): AP 0 where the ground truth has
  objects, -1 (pycocotools' "no ground truth") where it has none.
- layer-wise lr decay: ``moca_eval.mm_utils.ViTLayerDecayOptimizerConstructor`` (the adapter,
  FPN and heads at the base lr).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mmcv.cnn import build_norm_layer
from mmdet.evaluation import CocoMetric
from mmdet.registry import METRICS, MODELS
from mmengine.model import BaseModule
from torch import nn

from moca_eval.mm_utils import build_dense_vit

TARGET_STRIDES = (4, 8, 16, 32)
# COCO's area ranges as pycocotools uses them (inclusive bounds on the annotation's ``area``).
AREA_RANGES = {"s": (0.0, 32.0**2), "m": (32.0**2, 96.0**2), "l": (96.0**2, 1e10)}


def default_out_indices(depth: int) -> tuple[int, ...]:
    """0-based taps after blocks depth/3, depth/2, 2 depth/3 and depth: iBOT's (3, 5, 7, 11) for
    12 blocks and (7, 11, 15, 23) for 24."""
    return tuple(max(0, k - 1) for k in (depth // 3, depth // 2, 2 * depth // 3, depth))


def _adapter(embed_dim: int, factor: float, norm_cfg: dict) -> nn.Module:
    """Resample a patch-stride map by ``factor`` (a power of 2): 2x deconvolutions (norm + GELU
    between two of them), identity, or max-pool."""
    if factor < 1:
        k = round(1 / factor)
        return nn.MaxPool2d(kernel_size=k, stride=k)
    steps = round(factor).bit_length() - 1
    layers: list[nn.Module] = []
    for i in range(steps):
        if i:
            layers += [build_norm_layer(norm_cfg, embed_dim)[1], nn.GELU()]
        layers.append(nn.ConvTranspose2d(embed_dim, embed_dim, kernel_size=2, stride=2))
    return nn.Sequential(*layers) if layers else nn.Identity()


@MODELS.register_module()
class MocaEvalViTDet(BaseModule):
    """Any checkpoint moca-eval reads, as a 4-level mmdet backbone (see the module docstring).

    Args:
        checkpoint: the SSL checkpoint (any layout ``moca_eval.checkpoints.load_backbone`` reads):
            a path, or a ``BackboneConfig.to_dict()`` (which weights, how to read them).
        img_size: resolution the position table is resampled to when loading (None: the
            checkpoint's own); each input is then resampled to on the fly, any H x W.
        out_indices: 0-based blocks whose outputs feed strides 4, 8, 16, 32 (None:
            ``default_out_indices``, iBOT's).
        out_norm: apply the ViT's final LayerNorm to every tapped map (iBOT's detection: no; the
            norm is then frozen, being unused).
        drop_path_rate: stochastic depth of the ViT (iBOT ViT-B: 0.2).
        with_cp: activation checkpointing over the blocks (less memory, ~25% slower).
        norm_cfg: the norm between the two stride-4 deconvolutions (iBOT and BEiT: SyncBN).
    """

    def __init__(self, checkpoint: str | dict, img_size: int | None = None, *,
                 out_indices: Sequence[int] | None = None, out_norm: bool = False,
                 drop_path_rate: float = 0.2, with_cp: bool = False,
                 norm_cfg: dict | None = None, init_cfg: dict | None = None) -> None:
        super().__init__(init_cfg)
        self.vit = build_dense_vit(checkpoint, img_size=img_size, drop_path_rate=drop_path_rate)
        depth = len(self.vit.blocks)
        out_indices = default_out_indices(depth) if out_indices is None else out_indices
        if len(out_indices) != len(TARGET_STRIDES) or not all(0 <= i < depth for i in out_indices):
            raise ValueError(f"out_indices must be {len(TARGET_STRIDES)} block indices in [0, {depth}), "
                             f"got {tuple(out_indices)}")
        self.out_indices = tuple(int(i) for i in out_indices)
        self.out_norm = out_norm
        # Parameters no output depends on are frozen (DDP needs every trainable parameter used);
        # they stay in the module so the layer-decay ids keep the full depth.
        for block in self.vit.blocks[max(self.out_indices) + 1:]:
            block.requires_grad_(False)
        if not out_norm:
            self.vit.norm.requires_grad_(False)
        self.vit.set_grad_checkpointing(with_cp)
        patch = self.vit.patch_embed.patch_size[0]
        norm_cfg = norm_cfg or dict(type="SyncBN", requires_grad=True)
        self.adapters = nn.ModuleList(_adapter(self.vit.embed_dim, patch / stride, norm_cfg)
                                      for stride in TARGET_STRIDES)

    def init_weights(self) -> None:
        """The ViT comes from the checkpoint; the adapter keeps PyTorch's default initialisation."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        taps = sorted(set(self.out_indices))
        maps = self.vit.forward_intermediates(x, indices=taps, norm=self.out_norm, stop_early=True,
                                              intermediates_only=True)
        by_block = dict(zip(taps, maps))
        return tuple(adapter(by_block[i]) for adapter, i in zip(self.adapters, self.out_indices))


@METRICS.register_module()
class CocoAPMetric(CocoMetric):
    """``CocoMetric`` that gives numbers, not silence, when nothing at all was predicted."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics = super().compute_metrics(results)
        if self.format_only:
            return metrics
        for metric in self.metrics:
            if f"{metric}_mAP" in metrics or metric not in ("bbox", "segm"):
                continue
            filled = self._empty_prediction_metrics()
            metrics.update({f"{metric}_{k}": v for k, v in filled.items()})
        return metrics

    def _empty_prediction_metrics(self) -> dict[str, float]:
        areas = [a["area"] for a in self._coco_api.loadAnns(self._coco_api.getAnnIds(imgIds=self.img_ids,
                                                                                     catIds=self.cat_ids))
                 if not a.get("iscrowd", 0) and not a.get("ignore", False)]
        any_gt = 0.0 if areas else -1.0
        out = {"mAP": any_gt, "mAP_50": any_gt, "mAP_75": any_gt}
        for name, (lo, hi) in AREA_RANGES.items():
            out[f"mAP_{name}"] = 0.0 if any(lo <= a <= hi for a in areas) else -1.0
        return out
