"""What segmentation/ and detection/ share on mmengine: the backbone ViT, layer decay, resuming.

- ``build_dense_vit``: the timm ViT of any checkpoint moca-eval reads, rebuilt with drop path
  and a dynamic input size (position table resampled on the fly, input padded to the patch).
- ``layer_decay_param_groups``: BEiT/MAE layer-wise lr decay groups for that ViT (PROTOCOLS.md's
  rule; timm's own groups put a bare ViT's final norm into the last block and so scale every
  layer by one factor of decay too little), the lr already scaled (mmengine's optimizers and
  schedulers know no ``lr_scale``).
- ``ViTLayerDecayOptimizerConstructor`` (in mmengine's root registry, so mmseg and mmdet
  configs find it): ``model.backbone.vit`` in those groups, every other trainable parameter at
  the base lr; no weight decay on 1-d parameters (norms, biases), the pos-embed, the cls token.
- ``LoadImageOrFail`` (mmcv's image loader, in the root registry) and ``one_line_dataset_errors``:
  an unreadable image is a one-line DatasetError naming the file, also from a DataLoader worker.
- ``set_device_options`` / ``join_cpu_process_group``: bf16 autocast on GPU; on CPU, gloo and
  DDP without device ids, and torchrun's group joined before mmengine (its launcher needs CUDA).
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

from moca_eval import distributed
from moca_eval.checkpoint_io import SAFE_GLOBALS
from moca_eval.errors import DatasetError
from moca_eval.models import build_vit
from moca_eval.pipeline import BackboneConfig


def as_backbone_config(checkpoint: str | Path | dict | BackboneConfig) -> BackboneConfig:
    """A checkpoint path, a ``BackboneConfig`` or its ``to_dict()`` (as mmengine configs hold it)."""
    if isinstance(checkpoint, BackboneConfig):
        return checkpoint
    if isinstance(checkpoint, dict):
        return BackboneConfig.from_dict(checkpoint)
    return BackboneConfig(ckpt=Path(checkpoint))


def build_dense_vit(checkpoint: str | Path | dict | BackboneConfig, *, img_size: int | None,
                    drop_path_rate: float = 0.0) -> nn.Module:
    """The loader's ViT at ``img_size``, rebuilt with drop path and a dynamic input size."""
    backbone = as_backbone_config(checkpoint).load(img_size=img_size)
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


def vit_layer_id(name: str, depth: int) -> int:
    """BEiT/MAE layer ids (PROTOCOLS.md): patch embed, cls/register tokens, pos-embed and the
    pre-norm are 0, block i is i + 1, everything after the blocks is depth + 1."""
    if name.startswith(("patch_embed.", "cls_token", "reg_token", "pos_embed", "norm_pre.")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def layer_decay_param_groups(vit: nn.Module, *, lr: float, weight_decay: float, layer_decay: float
                             ) -> list[dict]:
    """lr x ``layer_decay ** (depth + 1 - layer)`` (``vit_layer_id``), no weight decay on 1-d
    parameters (norms, biases) and on ``vit.no_weight_decay()`` (pos-embed, cls token). Frozen
    parameters are left out."""
    depth = len(vit.blocks)
    no_wd = set(vit.no_weight_decay())
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in vit.named_parameters():
        if not param.requires_grad:
            continue
        layer = vit_layer_id(name, depth)
        decayed = param.ndim > 1 and name not in no_wd
        group = groups.setdefault((layer, decayed), {
            "params": [], "lr": lr * layer_decay ** (depth + 1 - layer),
            "weight_decay": weight_decay if decayed else 0.0})
        group["params"].append(param)
    return list(groups.values())


def on_cuda() -> bool:
    return torch.cuda.is_available()


def set_device_options(c) -> None:
    """An mmengine config's device-dependent parts: bf16 autocast on GPU; on CPU, gloo and DDP
    without device ids (mmengine's default wrapper pins DDP to cuda:LOCAL_RANK)."""
    if on_cuda():
        c.optim_wrapper.type = "AmpOptimWrapper"
        c.optim_wrapper.dtype = "bfloat16"
    else:
        c.env_cfg.dist_cfg.backend = "gloo"
        c.model_wrapper_cfg = dict(type="MMDistributedDataParallel", device_ids=None, broadcast_buffers=False)


def join_cpu_process_group() -> None:
    """Under torchrun on CPU, join the gloo group here: mmengine's "pytorch" launcher calls
    ``torch.cuda.set_device``, and it uses an existing group instead (no-op alone or on GPU)."""
    if not on_cuda():
        distributed.init_from_env("cpu")


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


def _register_constructor() -> type:
    from mmengine.optim import DefaultOptimWrapperConstructor
    from mmengine.registry import OPTIM_WRAPPER_CONSTRUCTORS

    @OPTIM_WRAPPER_CONSTRUCTORS.register_module(force=True)
    class ViTLayerDecayOptimizerConstructor(DefaultOptimWrapperConstructor):
        """``paramwise_cfg=dict(layer_decay=0.75)``: see the module docstring."""

        def add_params(self, params: list[dict], module: nn.Module, prefix: str = "",
                       is_dcn_module=None) -> None:
            vit = module.backbone.vit
            wd = self.base_wd or 0.0
            params.extend(layer_decay_param_groups(vit, lr=self.base_lr, weight_decay=wd,
                                                   layer_decay=self.paramwise_cfg.get("layer_decay", 1.0)))
            in_vit = {id(p) for p in vit.parameters()}
            rest = [p for p in module.parameters() if p.requires_grad and id(p) not in in_vit]
            for decayed in (True, False):
                group = [p for p in rest if (p.ndim > 1) == decayed]
                if group:
                    params.append({"params": group, "lr": self.base_lr,
                                   "weight_decay": wd if decayed else 0.0})

    return ViTLayerDecayOptimizerConstructor


ViTLayerDecayOptimizerConstructor = _register_constructor()


def _register_image_loader() -> type:
    from mmcv.transforms import LoadImageFromFile
    from mmengine.registry import TRANSFORMS

    @TRANSFORMS.register_module(force=True)
    class LoadImageOrFail(LoadImageFromFile):
        """mmcv's ``LoadImageFromFile``; an unreadable image is a DatasetError naming it."""

        def transform(self, results: dict) -> dict:
            try:
                return super().transform(results)
            except Exception as err:  # noqa: BLE001 - whatever the decoder raised
                reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise DatasetError(f"{results['img_path']}: cannot decode image ({reason})") from None

    return LoadImageOrFail


LoadImageOrFail = _register_image_loader()


@contextlib.contextmanager
def one_line_dataset_errors() -> Iterator[None]:
    """A DatasetError re-raised from a DataLoader worker carries the worker's traceback: keep its
    own one-line message."""
    try:
        yield
    except DatasetError as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise DatasetError(lines[-1].split("DatasetError: ", 1)[-1] if lines else str(err)) from None
