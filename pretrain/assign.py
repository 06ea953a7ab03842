"""Teacher codebook assignments and their adaptive temperature (paper Sec. 3.1).

Each teacher patch token ``z`` is softly assigned to the codebook words ``w_k`` by
``softmax_k(cos(z, w_k) / tau_T)``. The temperature adapts to how peaked the similarities
are: ``tau_T = mu_MSD / inv_delta`` (``inv_delta = 10``), where ``mu_MSD`` is an exponential
moving average (decay 0.99) of the per-token gap between the largest and the mean
similarity. In MOCA's code the assignment logits are ``cos * inv_delta / mu_MSD``, so the
average max-minus-mean logit gap stays at ``inv_delta``. Assignments use the value of
``mu_MSD`` from before the step; the step's statistic then updates it once (averaged over
both views and every process).

The image-wise target is the average assignment over the patch tokens more than ``border``
rows/columns from the edge (L1-normalised), as MOCA's ``compute_bow``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moca_eval.pretrain.codebook import NORMALIZE_EPS, OnlineCodebook, inner_token_ids


def cosine_to_codebook(tokens: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[N, L, K]`` of tokens ``[N, L, D]`` to unit-norm words ``[K, D]``."""
    return F.normalize(tokens.float(), dim=-1, eps=NORMALIZE_EPS) @ words.float().t()


def max_minus_mean(sims: torch.Tensor) -> torch.Tensor:
    """The mean over tokens of ``max_k sim - mean_k sim`` (the statistic behind ``mu_MSD``)."""
    return (sims.amax(dim=-1) - sims.mean(dim=-1)).mean()


def assignments(sims: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Soft assignments ``softmax(sims / tau)`` over the codebook axis."""
    return F.softmax(sims / tau, dim=-1)


def border_average(codes: torch.Tensor, *, grid: int, border: int) -> torch.Tensor:
    """Average assignment ``[N, K]`` of the tokens inside the border, L1-normalised."""
    if border > 0:
        codes = codes[:, inner_token_ids(grid, border, device=codes.device)]
    return F.normalize(codes.mean(dim=1), p=1, dim=1, eps=NORMALIZE_EPS)


class TeacherAssigner(nn.Module):
    """Codebook plus the running ``mu_MSD`` that sets the teacher temperature."""

    def __init__(self, codebook: OnlineCodebook, *, inv_delta: float = 10.0, decay: float = 0.99,
                 mu_init: float = 0.5) -> None:
        super().__init__()
        self.codebook = codebook
        self.inv_delta = inv_delta
        self.decay = decay
        self.register_buffer("mu_msd", torch.full((1,), mu_init))

    @property
    def tau(self) -> torch.Tensor:
        """The current teacher temperature ``mu_MSD / inv_delta`` (a 1-element tensor)."""
        return self.mu_msd / self.inv_delta

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Assignments ``[N, L, K]`` of teacher tokens to ``words``, and the max-minus-mean gap."""
        sims = cosine_to_codebook(tokens, words)
        return assignments(sims, self.tau), max_minus_mean(sims)

    @torch.no_grad()
    def update_mu(self, gap: torch.Tensor) -> None:
        """``mu_MSD <- decay * mu_MSD + (1 - decay) * gap`` (gap averaged over processes)."""
        gap = gap.detach().float().reshape(1).clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(gap)
            gap /= dist.get_world_size()
        self.mu_msd.mul_(self.decay).add_(gap, alpha=1.0 - self.decay)
