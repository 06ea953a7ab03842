"""MOCA's two losses and their combination (paper Sec. 3.2-3.3, Eq. for L).

Both compare a teacher assignment distribution ``t`` with the student's prediction
``p = softmax(logits)`` by ``KL(t || p) = sum t log t - sum t log p``, the soft cross-entropy
minus the target entropy (the same gradients as the cross-entropy; the value is 0 for a
perfect prediction), as MOCA's code does (``F.kl_div``).

- ``L_LOC``: same view. For every decoded token of a masked view, predict the teacher's
  assignment of that token in the unmasked view.
- ``L_IMG``: cross view. From the [AVG] token of a masked view, predict the other view's
  average teacher assignment (border ignored).

Both are symmetric over the two views: the batch holds view 1 then view 2, the per-view
means are summed (MOCA's ``mean * 2``), and with two masking rounds each loss is the mean
over rounds. ``L = lambda L_IMG + (1 - lambda) L_LOC`` with ``lambda = 0.5``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_to_target(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``KL(target || softmax(logits))``; rows are the last-but-one axes."""
    num_classes = logits.shape[-1]
    log_p = F.log_softmax(logits.float().reshape(-1, num_classes), dim=1)
    return F.kl_div(log_p, target.float().reshape(-1, num_classes), reduction="batchmean")


def local_loss(logits: torch.Tensor, codes: torch.Tensor, ids_decoded: torch.Tensor) -> torch.Tensor:
    """``L_LOC`` of one masking round over both views.

    Args:
        logits: decoder predictions ``[2N, M, K]`` for the decoded tokens.
        codes: teacher assignments of the same views ``[2N, L, K]``.
        ids_decoded: raster ids ``[2N, M]`` of the decoded tokens.
    """
    target = torch.gather(codes, 1, ids_decoded.unsqueeze(-1).expand(-1, -1, codes.shape[-1]))
    return 2.0 * kl_to_target(logits, target)


def image_loss(logits: torch.Tensor, avg_codes: torch.Tensor) -> torch.Tensor:
    """``L_IMG`` of one masking round: ``logits [2N, K]`` of views (1, 2) predict the average
    teacher assignments ``avg_codes [2N, K]`` of views (2, 1), i.e. the other view."""
    other = torch.cat(avg_codes.chunk(2, dim=0)[::-1], dim=0)
    return 2.0 * kl_to_target(logits, other)


def total_loss(loss_img: torch.Tensor, loss_loc: torch.Tensor, *, img_weight: float) -> torch.Tensor:
    """``L = lambda L_IMG + (1 - lambda) L_LOC``."""
    return img_weight * loss_img + (1.0 - img_weight) * loss_loc
