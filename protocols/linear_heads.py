"""The linear-probe head grid: one ``nn.Linear`` (and one SGD param group) per (feature, lr).

``HeadGrid`` computes every head's logits from one set of features; ``grid_loss`` sums the heads'
cross-entropies, so each head is trained exactly as if it were trained alone; ``GridSGD`` steps
all the per-head param groups together; ``head_accuracy`` scores every head in one pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moca_eval import distributed, runtime


class HeadGrid(nn.Module):
    """One linear head per (feature, lr); optional BatchNorm (no affine) per feature (MAE)."""

    def __init__(self, dims: Mapping[str, int], lrs: Sequence[float], num_classes: int, *,
                 batch_norm: bool = False, init_std: float = 0.01) -> None:
        super().__init__()
        self.features, self.lrs, self.num_classes = tuple(dims), tuple(lrs), num_classes
        self.norms = nn.ModuleList(nn.BatchNorm1d(d, affine=False, eps=1e-6) if batch_norm else nn.Identity()
                                   for d in dims.values())
        self.heads = nn.ModuleList(nn.ModuleList(nn.Linear(d, num_classes) for _ in self.lrs)
                                   for d in dims.values())
        for group in self.heads:
            for head in group:
                nn.init.normal_(head.weight, std=init_std)
                nn.init.zeros_(head.bias)

    @property
    def names(self) -> list[tuple[str, float]]:
        """``(feature, base_lr)`` of every head, in logit order."""
        return [(f, lr) for f in self.features for lr in self.lrs]

    def forward(self, feats: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Logits ``[B, heads, classes]``: the heads of a feature as one matmul."""
        return torch.cat([concat_heads(norm(feats[name]), heads)
                          for name, norm, heads in zip(self.features, self.norms, self.heads)], dim=1)

    def param_groups(self, lr_scale: float) -> list[dict[str, Any]]:
        """One SGD group per head, peaking at ``base_lr * lr_scale``."""
        return [{"params": list(head.parameters()), "peak_lr": lr * lr_scale, "lr": lr * lr_scale,
                 "head": f"{feature}@{lr:g}"}
                for feature, group in zip(self.features, self.heads) for lr, head in zip(self.lrs, group)]


def concat_heads(x: torch.Tensor, heads: nn.ModuleList) -> torch.Tensor:
    """``[B, H, C]`` logits of ``H`` linear heads as one matmul over their concatenated weights."""
    weight, bias = torch.cat([h.weight for h in heads]), torch.cat([h.bias for h in heads])
    return F.linear(x, weight, bias).unflatten(1, (len(heads), heads[0].out_features))


class GridSGD(torch.optim.SGD):
    """``torch.optim.SGD`` (momentum; no dampening, Nesterov or weight decay) that steps all param
    groups together: one foreach momentum update, then one foreach ``add_`` per distinct lr.

    ``SGD.step`` walks the groups one by one, paying its per-group overhead 135 times a step for the
    default grid; here it is paid once per distinct lr (45). The arithmetic is SGD's
    (``buf = m * buf + g``, first ``buf = g``; ``p += -lr * buf``) and so is the state layout
    (``momentum_buffer``), so checkpoints and ``load_state_dict`` are plain SGD's.

    ``trust_coefficient`` turns it into LARS as MAE's linear probe uses it (no weight decay): the
    gradient of every matrix (``ndim > 1``, i.e. each head's weight; not biases) is first scaled by
    ``trust_coefficient * ||p|| / ||g||`` (1 where either norm is 0).
    """

    def __init__(self, param_groups: list[dict[str, Any]], *, lr: float, momentum: float,
                 trust_coefficient: float | None = None) -> None:
        super().__init__(param_groups, lr=lr, momentum=momentum)
        self.trust_coefficient = trust_coefficient

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        if closure is not None:
            raise ValueError("GridSGD takes no closure")
        if self.trust_coefficient is not None:
            self._lars_scale_gradients()
        bufs, grads = [], []
        by_lr: dict[float, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = p.grad.detach().clone()
                else:
                    bufs.append(state["momentum_buffer"])
                    grads.append(p.grad)
                targets, updates = by_lr.setdefault(group["lr"], ([], []))
                targets.append(p)
                updates.append(state["momentum_buffer"])
        if bufs:
            torch._foreach_mul_(bufs, self.defaults["momentum"])
            torch._foreach_add_(bufs, grads)
        for lr, (targets, updates) in by_lr.items():
            torch._foreach_add_(targets, updates, alpha=-lr)

    def _lars_scale_gradients(self) -> None:
        """``g *= trust * ||p|| / ||g||`` for every matrix with a gradient, in one foreach pass."""
        params = [p for group in self.param_groups for p in group["params"]
                  if p.grad is not None and p.ndim > 1]
        if not params:
            return
        grads = [p.grad for p in params]
        p_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        ratio = torch.where((p_norm > 0) & (g_norm > 0),
                            self.trust_coefficient * p_norm / g_norm.clamp_min(1e-30),
                            torch.ones_like(p_norm))
        torch._foreach_mul_(grads, list(ratio.unbind()))


def grid_loss(logits: torch.Tensor, labels: torch.Tensor, denom: int) -> torch.Tensor:
    """Sum over heads of each head's cross-entropy, averaged over ``denom`` images."""
    heads = logits.shape[1]
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.repeat_interleave(heads),
                           reduction="sum") / denom


@torch.no_grad()
def head_accuracy(grid: HeadGrid, feats: Mapping[str, torch.Tensor], labels: torch.Tensor, *,
                  device: torch.device, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 and top-5 (percent) of every head; processes share the rows and sum the counts."""
    info = distributed.current()
    rows = torch.arange(info.rank, len(labels), info.world_size)
    counts = torch.zeros(len(grid.names), 2, dtype=torch.float64, device=device)
    was_training = grid.training
    grid.eval()
    for start in range(0, len(rows), chunk):
        part = rows[start:start + chunk]
        logits = grid({n: feats[n][part].to(device) for n in grid.features})
        target = labels[part].to(device)[:, None, None]
        hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == target
        counts[:, 0] += hits[..., 0].sum(0)
        counts[:, 1] += hits.any(-1).sum(0)
    grid.train(was_training)
    counts = runtime.all_reduce_sum(counts).cpu().numpy()
    return 100.0 * counts[:, 0] / len(labels), 100.0 * counts[:, 1] / len(labels)
