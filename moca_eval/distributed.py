"""torch.distributed helpers for ``torchrun``: set-up from the environment, ordered gathers."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group ``torchrun`` describes (gloo on CPU, NCCL on GPU); no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and device != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return current()


def current() -> DistInfo:
    """The rank and world size of the initialised group (rank 0 of 1 otherwise)."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def barrier() -> None:
    if current().world_size > 1:
        dist.barrier()


def gather_rows(values: torch.Tensor, rows: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each rank's ``values`` (one per dataset row in ``rows``) into dataset order.

    Ranks may hold different counts; padding rows carry index -1 and are discarded, so
    padding can never reorder or duplicate samples. Returns ``(values [total, ...], present
    mask [total])``; rows no rank produced (undecodable images) are marked absent.
    """
    info = current()
    out = torch.zeros((total, *values.shape[1:]), dtype=values.dtype)
    present = torch.zeros(total, dtype=torch.bool)
    if info.world_size == 1:
        out.index_copy_(0, rows, values)
        present[rows] = True
        return out, present
    dev = torch.device("cuda", info.local_rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(info.world_size)]
    dist.all_gather(counts, torch.tensor([len(rows)], device=dev))
    longest = int(max(c.item() for c in counts))
    pad_values = torch.zeros((longest, *values.shape[1:]), dtype=values.dtype)
    pad_rows = torch.full((longest,), -1, dtype=torch.long)
    pad_values[: len(rows)], pad_rows[: len(rows)] = values, rows
    pad_values, pad_rows = pad_values.to(dev), pad_rows.to(dev)
    all_values = [torch.empty_like(pad_values) for _ in range(info.world_size)]
    all_rows = [torch.empty_like(pad_rows) for _ in range(info.world_size)]
    dist.all_gather(all_values, pad_values)
    dist.all_gather(all_rows, pad_rows)
    for part_values, part_rows in zip(all_values, all_rows):
        part_values, part_rows = part_values.cpu(), part_rows.cpu()
        keep = part_rows >= 0
        out.index_copy_(0, part_rows[keep], part_values[keep])
        present[part_rows[keep]] = True
    return out, present
