"""Distributed start-up: torchrun processes and local spawned processes.

``init_distributed`` is the one place in the library that reads the launcher's environment.
``spawn`` runs a function in N local processes (gloo on CPU, NCCL on GPUs), returns each rank's
result, re-raises a failing rank's traceback, and turns a hang into a ``TimeoutError``.
"""

from __future__ import annotations

import os
import queue as queue_mod
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


@dataclass(frozen=True)
class DistributedContext:
    """What a process learned at start-up."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed(backend: str | None = None, *, timeout_s: float = 600.0) -> DistributedContext:
    """Initialise the default process group of a process started by ``torchrun``.

    Uses NCCL and the GPU ``LOCAL_RANK`` when CUDA is available, gloo on the CPU otherwise.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(
            f"init_distributed() expects a torchrun launch, but {', '.join(missing)} is not set; "
            "launch with `torchrun --nproc_per_node N script.py`, or use xdit_core.spawn for local processes"
        )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = _device_for(backend, local_rank)
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s), **kwargs
        )
    return DistributedContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def _device_for(backend: str, local_rank: int) -> torch.device:
    if backend == "nccl":
        if torch.cuda.device_count() <= local_rank:
            raise ValueError(
                f"backend nccl needs a GPU for local rank {local_rank}; {torch.cuda.device_count()} visible"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    backend: str,
    init_file: str,
    results: Any,
    args: tuple[Any, ...],
    timeout_s: float,
) -> None:
    try:
        device = _device_for(backend, rank)
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(
            backend,
            init_method=f"file://{init_file}",
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
            **kwargs,
        )
        try:
            value = fn(*args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, value))
    except BaseException:  # report everything, KeyboardInterrupt included
        results.put((rank, False, traceback.format_exc()))


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 600.0,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` fresh processes that form one process group.

    ``fn`` must be importable (a module-level function). Returns the per-rank return values in rank
    order. The first failing rank's traceback is re-raised as ``RuntimeError``; ranks still running
    are terminated. No result within ``timeout_s`` raises ``TimeoutError`` naming the silent ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="xdit_spawn_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs = [
            ctx.Process(
                target=_worker,
                args=(fn, rank, world_size, backend, init_file, results, args, timeout_s),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        try:
            return _collect(procs, results, world_size, timeout_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)


def _collect(procs: list[Any], results: Any, world_size: int, timeout_s: float) -> list[Any]:
    values: dict[int, Any] = {}
    deadline = time.monotonic() + timeout_s
    while len(values) < world_size:
        try:
            rank, ok, value = results.get(timeout=0.5)
        except queue_mod.Empty:
            dead = [r for r, p in enumerate(procs) if r not in values and p.exitcode not in (None, 0)]
            if dead:
                # Give the dead rank's own report a moment to arrive before blaming a crash.
                try:
                    rank, ok, value = results.get(timeout=2.0)
                except queue_mod.Empty:
                    raise RuntimeError(
                        f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} without a report"
                    ) from None
            elif time.monotonic() > deadline:
                silent = [r for r in range(world_size) if r not in values]
                raise TimeoutError(f"ranks {silent} gave no result within {timeout_s:.0f} s (hang?)") from None
            else:
                continue
        if not ok:
            raise RuntimeError(f"rank {rank} of {world_size} failed:\n{value}")
        values[rank] = value
    return [values[r] for r in range(world_size)]
