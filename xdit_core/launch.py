"""Distributed start-up: torchrun processes and local spawned processes.

``init_distributed`` is the one place in the library that reads the launcher's environment.
``spawn`` runs a function in N local processes (gloo on CPU, NCCL on GPUs), returns each rank's
result (tensors included), re-raises a failing rank's traceback, names a rank that died without a
report (its exit code or signal) ahead of the errors it caused in its peers, and turns a hang into a
``TimeoutError``.
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection, wait
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


# A rank's report to the parent: (kind, payload, failed_at). The payload is the result as torch.save
# bytes (_OK), a traceback (_FAILED) or why the result cannot be pickled (_UNSENDABLE); failed_at is the
# rank's wall-clock time of failure (0.0 for _OK), to put the earliest failure first.
_OK, _FAILED, _UNSENDABLE = "ok", "failed", "unsendable"
# After the first failure, how long to wait for a peer that died without a report (usually the cause).
_GRACE_S = 2.0
# A death without a report is dated this much before the parent saw it, so that its peers' errors (a closed
# connection), which follow it closely, are listed after it.
_DEATH_LEAD_S = 0.5
# How often to look at exit codes directly: a rank's forked child can hold its sentinel open after it died.
_POLL_S = 0.5


class _Unsendable(Exception):
    """The rank's return value cannot be pickled; the message says which part and why."""


def _worker(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    backend: str,
    init_file: str,
    conn: Connection,
    args: tuple[Any, ...],
    timeout_s: float,
) -> None:
    failed_at = 0.0
    try:
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
            report = (_OK, _encode(fn(*args)), 0.0)
        except BaseException:
            failed_at = time.time()  # before the teardown below wakes the peers with errors of their own
            raise
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except _Unsendable as e:
        report = (_UNSENDABLE, str(e), failed_at)
    except BaseException:  # report everything, KeyboardInterrupt included
        report = (_FAILED, traceback.format_exc(), failed_at or time.time())
    conn.send(report)
    conn.close()


def _encode(value: Any) -> bytes:
    """``value`` as ``torch.save`` bytes: tensor storage is copied in, not shared through file descriptors."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
    except Exception as e:
        where, part = _unpicklable_part(value, "result")
        raise _Unsendable(f"{where} is a {type(part).__qualname__}: {type(e).__name__}: {e}") from None
    return buffer.getvalue()


def _unpicklable_part(value: Any, where: str) -> tuple[str, Any]:
    """The innermost part of ``value`` (through dicts, lists, tuples, dataclasses) that fails to pickle."""
    outer = {id(value)}  # a container may hold itself
    while True:
        parts = ((step, part) for step, part in _parts(value) if id(part) not in outer)
        bad = next(((step, part) for step, part in parts if not _picklable(part)), None)
        if bad is None:
            return where, value
        where, value = where + bad[0], bad[1]
        outer.add(id(value))


def _parts(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [(f"[{key!r}]", part) for key, part in value.items()]
    if isinstance(value, (list, tuple)):
        return [(f"[{i}]", part) for i, part in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f".{field.name}", getattr(value, field.name)) for field in dataclasses.fields(value)]
    return []


def _picklable(value: Any) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    backend: str = "gloo",
    timeout_s: float = 600.0,
) -> list[Any]:
    """Run ``fn(*args)`` in ``world_size`` fresh processes that form one process group.

    ``fn`` must be importable (a module-level function). Returns the per-rank return values in rank
    order. A rank's value travels as ``torch.save`` bytes and is loaded with ``map_location="cpu"``:
    tensors (nested in lists, dicts, dataclasses too) come back as CPU copies, a GPU rank's included
    (the parent never touches a GPU), and views keep sharing storage as in the rank; a view carries its
    whole storage, so return ``t.clone()`` to send only the view. A value that cannot be pickled fails
    at once, naming the rank and the part that could not be pickled.

    Failures raise ``RuntimeError``; ranks still running are terminated. After the first failure,
    spawn waits up to two seconds for other ranks to fail or die, then lists the failures earliest
    first: the first in full (a traceback), the others in one line each. A rank that dies without a
    report (a signal, ``os._exit``) is named with its exit code or signal and dated half a second
    before its exit was seen, so that it leads the errors it causes in its peers (a closed connection).
    No result within ``timeout_s`` raises ``TimeoutError`` naming the silent ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, got {world_size}")
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="xdit_spawn_") as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        procs, readers = [], []
        try:
            for rank in range(world_size):
                reader, writer = ctx.Pipe(duplex=False)
                readers.append(reader)
                proc = ctx.Process(
                    target=_worker,
                    args=(fn, rank, world_size, backend, init_file, writer, args, timeout_s),
                    daemon=True,
                )
                procs.append(proc)
                proc.start()
                writer.close()  # the rank holds the only write end: its exit reads as end of file
            return _collect(procs, readers, world_size, timeout_s)
        finally:
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)
            for reader in readers:
                reader.close()


def _collect(procs: list[Any], readers: list[Connection], world_size: int, timeout_s: float) -> list[Any]:
    reports: dict[int, tuple[str, Any, float]] = {}
    exits: dict[int, tuple[int, float]] = {}  # exit code and wall-clock time seen (comparable with failed_at)
    listening = dict(enumerate(readers))  # ranks whose report (or end of file) is still to come
    running = dict(enumerate(procs))
    deadline = time.monotonic() + timeout_s
    grace_end: float | None = None
    while True:
        # A rank that exited and whose pipe is drained without a report died without one.
        silent = {r: e for r, e in exits.items() if r not in reports and r not in listening}
        if silent or any(kind != _OK for kind, _, _ in reports.values()):
            now = time.monotonic()
            if grace_end is None:
                grace_end = now + _GRACE_S
            if now >= grace_end or len(reports) + len(silent) == world_size:
                unheard = [r for r in sorted(running) if r not in reports]
                raise RuntimeError(_failure_message(world_size, reports, silent, unheard))
        elif len(reports) == world_size:
            return [_decode(r, world_size, reports[r][1]) for r in range(world_size)]
        elif time.monotonic() >= deadline:
            missing = [r for r in range(world_size) if r not in reports]
            raise TimeoutError(f"ranks {missing} gave no result within {timeout_s:.0f} s (hang?)")
        until = grace_end if grace_end is not None else deadline
        timeout = min(max(until - time.monotonic(), 0), _POLL_S)
        ready = wait([*listening.values(), *(p.sentinel for p in running.values())], timeout=timeout)
        seen_at = time.time()
        for rank, reader in list(listening.items()):
            if reader in ready:
                del listening[rank]
                try:
                    reports[rank] = reader.recv()
                except (EOFError, OSError):
                    pass  # closed without a report: the exit code says why
        for rank, p in list(running.items()):
            if p.sentinel in ready or p.exitcode is not None:
                p.join()
                exits[rank] = (p.exitcode, seen_at)
                del running[rank]
                if rank in listening and not listening[rank].poll():  # a forked child holds the pipe open
                    del listening[rank]


def _decode(rank: int, world_size: int, payload: bytes) -> Any:
    try:
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=False)
    except Exception as e:
        raise RuntimeError(
            f"rank {rank} of {world_size} returned a value that the parent cannot load: {type(e).__name__}: {e}"
        ) from e


def _failure_message(
    world_size: int,
    reports: dict[int, tuple[str, Any, float]],
    silent: dict[int, tuple[int, float]],
    unheard: list[int],
) -> str:
    """The failures, earliest first: the first in full (a traceback), the others in one line each.

    ``silent`` maps a rank that died without a report to its exit code and the time its exit was seen.
    """
    entries: list[tuple[float, int, str, str]] = []  # (when, rank, in full, in one line)
    for r, (code, seen_at) in silent.items():
        line = f"rank {r} exited with code {_exit_code(code)} without a report"
        entries.append((seen_at - _DEATH_LEAD_S, r, f"{line} (world size {world_size})", line))
    for r, (kind, payload, failed_at) in reports.items():
        head = f"rank {r} of {world_size}"
        if kind == _UNSENDABLE:
            line = f"{head} returned a value that cannot be sent back: {payload}"
            entries.append((failed_at, r, line, line))
        elif kind == _FAILED:
            last = [line for line in payload.splitlines() if line.strip()][-1:] or ["(no traceback)"]
            entries.append((failed_at, r, f"{head} failed:\n{payload.rstrip()}", f"{head} failed: {last[0]}"))
    entries.sort()
    lines = [entries[0][2]]
    if len(entries) > 1:
        lines += ["then, probably in consequence:", *(f"  {short}" for *_, short in entries[1:])]
    if unheard:
        lines.append(f"still running without a report (terminated): ranks {unheard}")
    return "\n".join(lines)


def _exit_code(code: int) -> str:
    if code >= 0:
        return str(code)
    try:
        return f"{code} ({signal.Signals(-code).name})"
    except ValueError:
        return str(code)
