"""Prototype generators: codebook -> student prototypes (paper Sec. 3.2, "Dynamic prototypes").

The codebook changes every step, so the student does not learn fixed prototypes: a small
network ``G`` turns the current codebook words into prototypes. MOCA has two, ``G^d`` for
the local (decoder) prediction and ``G^b`` for the image-wise (encoder [AVG]) prediction:
``L2Norm -> Linear (no bias) -> BatchNorm (statistics over the codebook items) -> ReLU ->
Linear``, plus a skip connection from the normalised input (a Linear when the widths
differ), and a final ``L2Norm``. Student logits are ``kappa * <feature, prototype>``
(``kappa = 3``, i.e. temperature 1/3); the features themselves are not normalised.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from moca_eval.pretrain.codebook import NORMALIZE_EPS


class PrototypeGenerator(nn.Module):
    """``G``: ``[K, D_in]`` codebook words -> ``[K, D_out]`` unit-norm prototypes."""

    def __init__(self, dim_in: int, dim_out: int, *, hidden: int) -> None:
        super().__init__()
        self.generator = nn.Sequential(OrderedDict([  # MOCA's layer names (checkpoint keys)
            ("b0_fc", nn.Linear(dim_in, hidden, bias=False)),
            ("b0_bn", nn.BatchNorm1d(hidden)),
            ("b0_rl", nn.ReLU()),
            ("b0_last_layer", nn.Linear(hidden, dim_out)),
        ]))
        self.skip = nn.Identity() if dim_in == dim_out else nn.Linear(dim_in, dim_out)

    def forward(self, words: torch.Tensor) -> torch.Tensor:
        x = F.normalize(words, dim=1, eps=NORMALIZE_EPS)
        return F.normalize(self.generator(x) + self.skip(x), dim=1, eps=NORMALIZE_EPS)


def prototype_logits(features: torch.Tensor, prototypes: torch.Tensor, *, kappa: float) -> torch.Tensor:
    """Student logits ``kappa * features @ prototypes.T`` over the codebook axis (last)."""
    return kappa * features @ prototypes.t()
