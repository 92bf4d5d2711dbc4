"""Helpers the model workloads share: agreeing on a value across ranks, a reference computed once, a median step."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def agreed_max(value: float, device: torch.device) -> float:
    """The maximum of ``value`` over all ranks (so every rank reports, and branches on, the same)."""
    t = torch.tensor([value], dtype=torch.float64, device=device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def world_one_reference(cache: Path, world: int, compute: Callable[[], dict[str, Any]]) -> dict[str, Any] | None:
    """``compute()`` on world 1 when ``cache`` does not exist yet, saved there (tensors on the CPU);
    every world then loads it. ``None`` where no world-1 run has made it."""
    if world == 1 and not cache.exists():
        result = compute()
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: v.cpu() if torch.is_tensor(v) else v for k, v in result.items()}, cache)
        del result
    dist.barrier()
    return torch.load(cache) if cache.exists() else None


def median_ms(fn: Callable[[], Any], reps: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in ms over ``reps`` CUDA-synchronised calls, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
