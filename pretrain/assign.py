"""Teacher codebook assignments and their adaptive temperature (paper Sec. 3.1).

Each teacher patch token ``z`` is softly assigned to the codebook words ``w_k`` by
``softmax_k(cos(z, w_k) / tau_T)``. The temperature adapts to how peaked the similarities
are: ``tau_T = mu_MSD / inv_delta`` (``inv_delta = 10``), where ``mu_MSD`` is an exponential
moving average (decay 0.99) of the per-token gap between the largest and the mean
similarity. In MOCA's code the assignment logits are ``cos * inv_delta / mu_MSD``, so the
average max-minus-mean logit gap stays at ``inv_delta``. As in MOCA's ``assign_words``, each
view's statistic (averaged over processes) updates the average in turn, view 1 then view 2,
so one step gives ``mu <- 0.99^2 mu + 0.0099 gap_1 + 0.01 gap_2``; both views are assigned
with the value from before the step (MOCA's ``_dist_norm_prev``).

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


def gap_per_view(sims: torch.Tensor, *, views: int = 2) -> torch.Tensor:
    """``max_minus_mean`` of each view ``[views]``; ``sims [views * n, L, K]`` holds view 1 first."""
    return torch.stack([max_minus_mean(chunk) for chunk in sims.chunk(views, dim=0)])


def assignments(sims: torch.Tensor, tau: float | torch.Tensor) -> torch.Tensor:
    """Soft assignments ``softmax(sims / tau)`` over the codebook axis."""
    return F.softmax(sims / tau, dim=-1)


def border_average(codes: torch.Tensor, *, grid: int, border: int) -> torch.Tensor:
    """Average assignment ``[N, K]`` of the tokens inside the border, L1-normalised."""
    if border > 0:
        codes = codes[:, inner_token_ids(grid, border, device=codes.device)]
    return F.normalize(codes.mean(dim=1), p=1, dim=1, eps=NORMALIZE_EPS)


class TeacherAssigner(nn.Module):
    """Codebook plus the running ``mu_MSD`` that sets the teacher temperature.

    ``num_updates`` counts the codebook updates (steps), as MOCA's ``_track_num_batches``.
    """

    def __init__(self, codebook: OnlineCodebook, *, inv_delta: float = 10.0, decay: float = 0.99,
                 mu_init: float = 0.5) -> None:
        super().__init__()
        self.codebook = codebook
        self.inv_delta = inv_delta
        self.decay = decay
        self.register_buffer("mu_msd", torch.full((1,), mu_init))
        self.register_buffer("num_updates", torch.zeros(1))

    @property
    def tau(self) -> torch.Tensor:
        """The current teacher temperature ``mu_MSD / inv_delta`` (a 1-element tensor)."""
        return self.mu_msd / self.inv_delta

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Assignments ``[2n, L, K]`` of both views' teacher tokens ``[2n, L, D]`` (view 1
        first) to ``words``, and each view's max-minus-mean gap ``[2]``."""
        sims = cosine_to_codebook(tokens, words)
        return assignments(sims, self.tau), gap_per_view(sims)

    @torch.no_grad()
    def update_mu(self, gaps: torch.Tensor) -> None:
        """``mu_MSD <- decay * mu_MSD + (1 - decay) * gap`` for each gap in order (each one
        averaged over processes): one update per view, as MOCA."""
        gaps = gaps.detach().float().reshape(-1).clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(gaps)
            gaps /= dist.get_world_size()
        for gap in gaps:
            self.mu_msd.mul_(self.decay).add_(gap, alpha=1.0 - self.decay)

    @torch.no_grad()
    def update(self, new_words: torch.Tensor, gaps: torch.Tensor) -> None:
        """The end of a step: push ``new_words`` into the codebook, update ``mu_MSD``, count."""
        self.codebook.push(new_words)
        self.update_mu(gaps)
        self.num_updates += 1
