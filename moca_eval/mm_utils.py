"""What segmentation/ and detection/ share on mmengine: the backbone ViT, layer decay, resuming.

- ``build_dense_vit``: the timm ViT of any checkpoint moca-eval reads, rebuilt with drop path
  and a dynamic input size (position table resampled on the fly, input padded to the patch).
- ``layer_decay_param_groups``: timm's layer-wise lr decay groups for that ViT, with the lr
  already scaled (mmengine's optimizers and schedulers know no ``lr_scale``).
- ``mmengine_checkpoints``: mmengine 0.10.7 calls ``torch.load`` without ``weights_only``; under
  torch >= 2.6 its own resume checkpoints (numpy arrays and scalars, its ``HistoryBuffer`` log
  state) need an allow-list, applied inside the block and nowhere else (user checkpoints are
  never read by mmengine; moca-eval's loader reads them with its own allow-list). ``getattr``
  is never allowed (it reaches anything): ``HistoryBuffer`` pickles its statistics methods
  through it, so inside the block it saves its data without them (they are class-level and
  re-registered by every new buffer, so nothing is lost on resume).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from moca_eval.checkpoint_io import SAFE_GLOBALS
from moca_eval.checkpoints import load_backbone
from moca_eval.models import build_vit


def build_dense_vit(checkpoint: str | Path, *, img_size: int, drop_path_rate: float = 0.0,
                    **load_kwargs) -> nn.Module:
    """The loader's ViT at ``img_size``, rebuilt with drop path and a dynamic input size."""
    backbone = load_backbone(checkpoint, img_size=img_size, **load_kwargs)
    vit = build_vit(backbone.arch, drop_path_rate=drop_path_rate, dynamic_img_size=True,
                    dynamic_img_pad=True)
    vit.load_state_dict(backbone.model.state_dict())
    vit.pos_embed.requires_grad_(backbone.model.pos_embed.requires_grad)
    return vit


def patch_token_map(vit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Final-LN patch tokens of ``x`` as ``[B, D, ceil(H/p), ceil(W/p)]`` (a ``build_dense_vit`` ViT)."""
    tokens = vit.forward_features(x)[:, vit.num_prefix_tokens:]
    p = vit.patch_embed.patch_size
    grid = (-(-x.shape[-2] // p[0]), -(-x.shape[-1] // p[1]))
    return tokens.transpose(1, 2).reshape(x.shape[0], -1, *grid)


def layer_decay_param_groups(vit: nn.Module, *, lr: float, weight_decay: float, layer_decay: float
                             ) -> list[dict]:
    """timm's groups: lr x ``layer_decay ** (depth + 1 - layer)`` (patch embed, pos-embed and cls
    token are layer 0, block i is layer i + 1), no weight decay on 1-d parameters (norms,
    biases) and on ``vit.no_weight_decay()`` (pos-embed, cls token). Frozen parameters are left out."""
    from timm.optim import param_groups_layer_decay

    groups = param_groups_layer_decay(vit, weight_decay=weight_decay, layer_decay=layer_decay,
                                      no_weight_decay_list=list(vit.no_weight_decay()))
    out = []
    for group in groups:
        params = [p for p in group["params"] if p.requires_grad]
        if params:
            out.append({"params": params, "lr": lr * group["lr_scale"],
                        "weight_decay": group["weight_decay"]})
    return out


def mmengine_globals() -> list:
    from mmengine.logging.history_buffer import HistoryBuffer

    return [*SAFE_GLOBALS, HistoryBuffer]


def _state_without_methods(buffer) -> dict:
    return {k: v for k, v in buffer.__dict__.items() if k != "statistics_methods"}


@contextlib.contextmanager
def mmengine_checkpoints() -> Iterator[None]:
    """Inside the block mmengine writes and reads its checkpoints with ``weights_only`` loads."""
    from mmengine.logging.history_buffer import HistoryBuffer

    saved = HistoryBuffer.__getstate__
    HistoryBuffer.__getstate__ = _state_without_methods
    try:
        with torch.serialization.safe_globals(mmengine_globals()):
            yield
    finally:
        HistoryBuffer.__getstate__ = saved
