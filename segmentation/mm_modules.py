"""moca-eval parts registered in mmseg's registries (imported through the configs' ``custom_imports``).

- ``MocaEvalViT``: a backbone that is the timm ViT returned by moca-eval's checkpoint loader
  (so every layout it reads works; ``moca_eval.mm_utils.build_dense_vit``), giving the final-LN
  patch tokens as one ``[B, D, H/p, W/p]`` map. ``frozen``: no gradients, always in eval mode.
- ``PerClassIoUMetric``: mmseg's ``IoUMetric`` that also returns every class's IoU.
- (fine-tuning with ``--layer-decay`` uses ``moca_eval.mm_utils.ViTLayerDecayOptimizerConstructor``)
"""

from __future__ import annotations

import numpy as np
import torch
from mmengine.model import BaseModule
from mmseg.evaluation import IoUMetric
from mmseg.registry import METRICS, MODELS

from moca_eval.mm_utils import build_dense_vit, patch_token_map


@MODELS.register_module()
class MocaEvalViT(BaseModule):
    """Any checkpoint moca-eval reads, as an mmseg backbone (see the module docstring)."""

    def __init__(self, checkpoint: str | dict, img_size: int, *, frozen: bool = False,
                 drop_path_rate: float = 0.0, init_cfg: dict | None = None) -> None:
        """``checkpoint``: a path or a ``BackboneConfig.to_dict()`` (which weights, how to read them)."""
        super().__init__(init_cfg)
        self.vit = build_dense_vit(checkpoint, img_size=img_size, drop_path_rate=drop_path_rate)
        self.frozen = frozen
        if frozen:
            self.vit.requires_grad_(False)
            self.vit.eval()

    def init_weights(self) -> None:
        """Weights come from the checkpoint: nothing to initialise."""

    def train(self, mode: bool = True) -> MocaEvalViT:
        super().train(mode)
        if self.frozen:
            self.vit.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return (patch_token_map(self.vit, x),)


@METRICS.register_module()
class PerClassIoUMetric(IoUMetric):
    """``IoUMetric`` (mIoU, aAcc, mAcc, in percent) plus ``IoU.<class>`` for every class (NaN
    when the class is in neither the labels nor the predictions)."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        metrics = super().compute_metrics(results)
        intersect, union = (sum(parts) for parts in list(zip(*results))[:2])
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = (torch.as_tensor(intersect) / torch.as_tensor(union)).numpy()
        for name, value in zip(self.dataset_meta["classes"], iou):
            metrics[f"IoU.{name}"] = float(value * 100)
        return metrics
