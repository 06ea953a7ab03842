"""ViT architectures: a small spec, a timm builder and the fixed 2-D sin-cos position table."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import numpy as np
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

# Heads for the standard widths; other widths fall back to a rule (see ``default_num_heads``).
STANDARD_HEADS = {192: 3, 384: 6, 768: 12, 1024: 16, 1280: 16, 1408: 16, 1536: 24}


@dataclass(frozen=True)
class ArchSpec:
    """Everything needed to build a plain ViT backbone (no head)."""

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int = 16
    img_size: int = 224
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None  # LayerScale (DINOv2, iBOT ViT-L); None = no LayerScale
    reg_tokens: int = 0
    no_embed_class: bool = False  # pos-embed covers patches only (DINOv2 with registers)
    in_chans: int = 3

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.reg_tokens

    def describe(self) -> str:
        """A short human name such as ``vit_base/16@224``."""
        name = next((k for k, v in ARCHS.items() if _same_shape(v, self)), None)
        extra = f"+reg{self.reg_tokens}" if self.reg_tokens else ""
        base = name or f"vit(d={self.embed_dim},L={self.depth},h={self.num_heads})"
        return f"{base}{extra}/{self.patch_size}@{self.img_size}"


def _same_shape(a: ArchSpec, b: ArchSpec) -> bool:
    return (a.embed_dim, a.depth, a.num_heads, a.mlp_ratio) == (
        b.embed_dim,
        b.depth,
        b.num_heads,
        b.mlp_ratio,
    )


ARCHS: dict[str, ArchSpec] = {
    "vit_tiny": ArchSpec(embed_dim=192, depth=12, num_heads=3),
    "vit_small": ArchSpec(embed_dim=384, depth=12, num_heads=6),
    "vit_base": ArchSpec(embed_dim=768, depth=12, num_heads=12),
    "vit_large": ArchSpec(embed_dim=1024, depth=24, num_heads=16),
}


def default_num_heads(embed_dim: int) -> int:
    """Heads for a width: the standard table, else head dim 64, else head dim 32."""
    if embed_dim in STANDARD_HEADS:
        return STANDARD_HEADS[embed_dim]
    return embed_dim // 64 if embed_dim % 64 == 0 else max(1, embed_dim // 32)


def build_vit(arch: ArchSpec, **timm_kwargs: object) -> VisionTransformer:
    """A timm ``VisionTransformer`` for ``arch`` with no head and LayerNorm eps 1e-6.

    Extra keyword arguments (``drop_path_rate``, ``global_pool``, ``num_classes``,
    ``dynamic_img_size`` ...) go straight to timm.
    """
    kwargs: dict[str, object] = dict(
        img_size=arch.img_size,
        patch_size=arch.patch_size,
        in_chans=arch.in_chans,
        embed_dim=arch.embed_dim,
        depth=arch.depth,
        num_heads=arch.num_heads,
        mlp_ratio=arch.mlp_ratio,
        qkv_bias=arch.qkv_bias,
        init_values=arch.init_values,
        reg_tokens=arch.reg_tokens,
        no_embed_class=arch.no_embed_class,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
    )
    kwargs.update(timm_kwargs)
    return VisionTransformer(**kwargs)  # type: ignore[arg-type]


def with_img_size(arch: ArchSpec, img_size: int) -> ArchSpec:
    """The same architecture evaluated at another resolution."""
    return replace(arch, img_size=img_size)


def sincos_pos_embed(embed_dim: int, grid_size: int, *, cls_token: bool = True) -> torch.Tensor:
    """MAE/MOCA fixed 2-D sin-cos table, ``[1, (1 +) g*g, D]``, zero row for CLS.

    Half the channels encode the row (h) and half the column (w) coordinate, each as
    ``[sin(pos * omega), cos(pos * omega)]`` with ``omega = 1 / 10000^(2i/(D/2))``.
    """
    if embed_dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    coords = np.arange(grid_size, dtype=np.float64)
    grid_w, grid_h = np.meshgrid(coords, coords)  # w varies fastest, as in MAE

    def encode_1d(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4.0))
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    table = np.concatenate([encode_1d(grid_w), encode_1d(grid_h)], axis=1)
    if cls_token:
        table = np.concatenate([np.zeros((1, embed_dim)), table], axis=0)
    return torch.from_numpy(table).float().unsqueeze(0)


def is_sincos(pos_embed: torch.Tensor, *, num_prefix: int) -> bool:
    """True when ``pos_embed`` equals MAE/MOCA's fixed sin-cos table (so it can be recomputed)."""
    grid = round((pos_embed.shape[1] - num_prefix) ** 0.5)
    if grid * grid != pos_embed.shape[1] - num_prefix or pos_embed.shape[-1] % 4:
        return False
    reference = sincos_pos_embed(pos_embed.shape[-1], grid, cls_token=False)
    return torch.allclose(pos_embed[:, num_prefix:].float(), reference, atol=1e-4)


def resize_pos_embed(
    pos_embed: torch.Tensor, *, new_grid: int, num_prefix: int, sincos: bool,
    dinov2_offset: bool = False,
) -> torch.Tensor:
    """Resize a ``[1, prefix + g*g, D]`` table to ``new_grid``.

    Fixed sin-cos tables are recomputed exactly; learned ones are resampled bicubically
    (timm's ``resample_abs_pos_embed``, antialiased, which is also what DINOv2 does for its
    register models). ``dinov2_offset`` reproduces DINOv2's interpolation for its models
    without registers: ``scale_factor=(new + 0.1) / old``, no antialiasing.
    """
    old_grid = round((pos_embed.shape[1] - num_prefix) ** 0.5)
    if old_grid == new_grid:
        return pos_embed
    if sincos and num_prefix <= 1:
        fresh = sincos_pos_embed(pos_embed.shape[-1], new_grid, cls_token=False)
        return torch.cat([pos_embed[:, :num_prefix], fresh.to(pos_embed.dtype)], dim=1)
    if dinov2_offset:
        grid = pos_embed[:, num_prefix:].reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)
        scale = (new_grid + 0.1) / old_grid
        grid = torch.nn.functional.interpolate(grid.float(), scale_factor=(scale, scale), mode="bicubic",
                                               antialias=False)
        patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos_embed.dtype)
        return torch.cat([pos_embed[:, :num_prefix], patches], dim=1)
    return resample_abs_pos_embed(
        pos_embed, new_size=[new_grid, new_grid], old_size=[old_grid, old_grid],
        num_prefix_tokens=num_prefix,
    )
