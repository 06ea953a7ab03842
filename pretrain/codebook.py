"""The online codebook: a queue of teacher patch embeddings (paper Sec. 3.1, "Online codebook").

The codebook holds ``K`` L2-normalised teacher patch-token embeddings. Every step, ``K_new``
new ones replace the oldest: one random patch token from each of ``K_new`` random images
of the batch (tokens within ``border`` rows/columns of the edge are never picked, as in
MOCA's code). It starts from random normal vectors (clamped at zero and normalised, as in
MOCA's code). Under DDP the ``K_new`` images are drawn from the global batch with a
generator every process shares, each process fills in the ones it holds, and a sum over
processes gives all of them the same new words, so every process keeps the same queue.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

NORMALIZE_EPS = 1e-5


def inner_token_ids(grid: int, border: int, *, device: torch.device | None = None) -> torch.Tensor:
    """Raster ids of the tokens of a ``grid x grid`` map more than ``border`` from the edge."""
    ids = torch.arange(grid * grid, device=device).view(grid, grid)
    return ids[border : grid - border, border : grid - border].reshape(-1)


class OnlineCodebook(nn.Module):
    """FIFO queue of ``num_words`` teacher embeddings; ``ptr`` points at the oldest block."""

    def __init__(self, num_words: int, dim: int, *, num_new: int) -> None:
        super().__init__()
        if num_words % num_new:
            raise ValueError(f"num_words {num_words} must be a multiple of num_new {num_new}")
        self.num_new = num_new
        words = F.normalize(torch.randn(num_words, dim).clamp(min=0), dim=1, eps=NORMALIZE_EPS)
        self.register_buffer("words", words)
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long))

    @property
    def num_words(self) -> int:
        return self.words.shape[0]

    @torch.no_grad()
    def push(self, new_words: torch.Tensor) -> None:
        """Replace the ``len(new_words)`` oldest words by ``new_words`` (normalised)."""
        count = new_words.shape[0]
        if self.num_words % count:
            raise ValueError(f"pushing {count} words into a queue of {self.num_words}")
        start = int(self.ptr)
        self.words[start : start + count] = F.normalize(new_words.float(), dim=1, eps=NORMALIZE_EPS)
        self.ptr[0] = (start + count) % self.num_words


def pick_new_words(
    tokens: torch.Tensor,
    *,
    num_new: int,
    grid: int,
    border: int,
    generator: torch.Generator,
    offset: int = 0,
    global_batch: int | None = None,
) -> torch.Tensor:
    """``num_new`` teacher tokens: a random inner patch of each of ``num_new`` random images.

    Args:
        tokens: this process's teacher patch tokens ``[n, L, D]`` (no CLS).
        generator: CPU generator, in the same state on every process.
        offset: index of this process's first image in the global batch.
        global_batch: images in the global batch (default ``n``: one process).

    Returns:
        ``[num_new, D]``, identical on every process (summed over processes under DDP).
    """
    n = tokens.shape[0]
    total = n if global_batch is None else global_batch
    if num_new > total:
        raise ValueError(f"cannot pick {num_new} new words from a batch of {total} images")
    images = torch.randperm(total, generator=generator)[:num_new]
    inner = inner_token_ids(grid, border)
    positions = inner[torch.randint(len(inner), (num_new,), generator=generator)]
    mine = (images >= offset) & (images < offset + n)
    picked = torch.zeros(num_new, tokens.shape[2], device=tokens.device, dtype=torch.float32)
    rows = (images[mine] - offset).to(tokens.device)
    picked[mine.to(tokens.device)] = tokens[rows, positions[mine].to(tokens.device)].float()
    if total != n and dist.is_available() and dist.is_initialized():
        dist.all_reduce(picked)
    return picked
