"""Rank helpers for evaluation under DDP (Fabric, torchrun or SLURM initialise the group).

Every metric keeps plain sums and counts on each rank and reduces them once at the end,
so a split seen by N ranks gives the numbers of one rank (up to float64 summation order).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """Sum of ``tensor`` over ranks (a new tensor; the input is left alone)."""
    out = tensor.clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_max(tensor: Tensor) -> Tensor:
    out = tensor.clone()
    if is_distributed():
        dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Picklable ``obj`` from every rank, in rank order."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def reduce_device(reference: torch.device) -> torch.device:
    """Device collectives must use: CUDA for NCCL, CPU for gloo."""
    if is_distributed() and dist.get_backend() == "nccl":
        return reference if reference.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
