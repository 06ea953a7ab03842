"""The condenser decoder of the local prediction task (paper Sec. 3.3, "Condenser decoder").

Inputs are the student's visible patch tokens from an intermediate block (layer 8 of 12 for
ViT-B, after an extra LayerNorm) and the student's last-layer [AVG] token. Reading the
patch tokens from an early layer forces the local information to flow through [AVG],
which is why the decoder "condenses" the image into it. Both are projected to the decoder
width; a learnable mask token stands in for every masked token that is decoded; fixed 2-D
sin-cos positions are added (the [AVG] token has its own position, the table's extra row);
``depth`` timm Blocks and a LayerNorm follow. Only the decoded tokens go through the
decoder (partial decoding), and their outputs are returned in ``ids_decoded`` order.
"""

from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from moca_eval.models import sincos_pos_embed


class CondenserDecoder(nn.Module):
    """Predicts per-token features for the decoded tokens from early tokens plus [AVG]."""

    def __init__(self, embed_dim: int, dim: int, *, depth: int, num_heads: int, grid: int,
                 mlp_ratio: float = 4.0) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm_in = norm(embed_dim)
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed(dim, grid, cls_token=True))
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(dim)

    def forward(self, avg: torch.Tensor, early: torch.Tensor, ids_decoded: torch.Tensor) -> torch.Tensor:
        """Decode.

        Args:
            avg: the student's last-layer [AVG] token ``[N, D]``.
            early: the visible patch tokens of the intermediate block ``[N, V, D]``, in the
                order of ``ids_decoded[:, :V]``.
            ids_decoded: raster ids ``[N, M]`` of the decoded tokens, visible ones first.

        Returns:
            Decoder features ``[N, M, dim]`` of the decoded tokens ([AVG] removed).
        """
        n, visible = early.shape[:2]
        tokens = self.embed(torch.cat([avg.unsqueeze(1), self.norm_in(early)], dim=1))
        masked = self.mask_token.expand(n, ids_decoded.shape[1] - visible, -1)
        patches = torch.cat([tokens[:, 1:], masked.to(tokens.dtype)], dim=1)
        table = self.pos_embed.to(tokens.dtype)
        pos = table[0, 1:][ids_decoded]  # [N, M, dim]
        x = torch.cat([tokens[:, :1] + table[:, :1], patches + pos], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1:]
