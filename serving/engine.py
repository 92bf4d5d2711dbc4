"""The serving loop on every rank: rank 0 takes batches from the scheduler and shares each with the others
over a control group; all ranks run it; every failure is agreed on, so no rank waits for another forever.

The control group is a gloo group of its own (CPU objects, its own timeout), separate from the
pipeline's groups. Rank 0 (:meth:`Engine.lead`) broadcasts one message at a time: ``("batch",
requests)``, ``("idle",)`` every ``heartbeat_s`` while the queue is empty (so a follower's wait is
bounded and a lost rank 0 is noticed), or ``("stop",)`` once the scheduler is closed and drained. The
other ranks (:meth:`Engine.follow`) execute what they receive.

Failures (:meth:`Engine.execute`, on every rank):

============================  ==================================================================
where                         what happens
============================  ==================================================================
before the pipeline           each rank checks each request; the ranks gather the results; a
                              request refused on any rank fails (500), the others run
at a denoising step's end     every rank reports ok / failed (one all-reduce); if any failed,
                              every rank leaves the pipeline there (:class:`StepAborted`)
raised on every rank          each rank catches it; the ranks gather the errors
a batch of several failed     each request is run again alone: only the one that fails gets a 500
a collective timed out        the communicators are broken: every rank logs it and the server
                              stops (exit 1; rank 0 answers 503 to what is queued)
============================  ==================================================================

A rank that raises inside a collective while the others wait in it leaves them waiting until the
pipeline's collective timeout; that is the last row. ``--fault-injection RANK:STAGE:TEXT`` (tests)
raises on rank ``RANK`` at ``STAGE`` (``prepare`` or ``denoise``) for requests whose prompt contains
``TEXT``.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from serving.scheduler import Entry, Scheduler

log = logging.getLogger("xdit.serve")
STAGES = ("prepare", "denoise")


class InjectedFault(RuntimeError):
    """The failure ``--fault-injection`` asked for."""


class StepAborted(RuntimeError):
    """Another rank failed at this denoising step; every rank leaves the pipeline together."""


class EngineStopped(RuntimeError):
    """The engine cannot go on (a collective timed out, a rank is gone); the server stops."""


@dataclass(frozen=True)
class Fault:
    """Raise on ``rank`` at ``stage`` for requests whose prompt contains ``text`` (``--fault-injection``)."""

    rank: int
    stage: str
    text: str

    @classmethod
    def parse(cls, spec: str) -> Fault:
        parts = spec.split(":", 2)
        if len(parts) != 3 or not parts[0].isdigit() or parts[1] not in STAGES or not parts[2]:
            raise ValueError(f"--fault-injection {spec!r} must be RANK:STAGE:TEXT with STAGE one of {list(STAGES)}")
        return cls(int(parts[0]), parts[1], parts[2])

    def check(self, rank: int, stage: str, prompts: Sequence[str]) -> None:
        if rank == self.rank and stage == self.stage and any(self.text in p for p in prompts):
            raise InjectedFault(f"injected fault on rank {rank} at {stage} (prompt contains {self.text!r})")


@dataclass
class Outcome:
    """A request's result on this rank, or the error every rank agreed on (``None``: it ran)."""

    result: Any = None
    error: str | None = None


class Engine:
    """One rank's part. ``served`` has ``run(requests, on_step)``; ``scheduler`` only on rank 0."""

    def __init__(
        self,
        served: Any,
        group: dist.ProcessGroup,
        *,
        scheduler: Scheduler | None = None,
        faults: tuple[Fault, ...] = (),
        heartbeat_s: float = 1.0,
        on_batch: Callable[[list[Entry], float], None] | None = None,
    ) -> None:
        self.served, self.group, self.faults = served, group, faults
        self.rank, self.world = group.rank(), group.size()
        if (self.rank == 0) != (scheduler is not None):
            raise ValueError("Engine: rank 0 (and only rank 0) takes a scheduler")
        self.scheduler, self.heartbeat_s, self.on_batch = scheduler, heartbeat_s, on_batch

    # ------------------------------------------------------------------------------ the loops
    def lead(self) -> None:
        """Rank 0: until the scheduler is closed and drained. Raises :class:`EngineStopped` on a broken group."""
        scheduler = self.scheduler
        assert scheduler is not None
        try:
            while True:
                batch = scheduler.next_batch(self.heartbeat_s)
                if batch is None:
                    if scheduler.closed and not len(scheduler):
                        self._send(("stop",))
                        return
                    self._send(("idle",))
                    continue
                live = [e for e in batch if e.future.set_running_or_notify_cancel()]  # drop the withdrawn
                if not live:
                    continue
                self._send(("batch", [e.request for e in live]))
                start = time.perf_counter()
                outcomes = self.execute([e.request for e in live], self._reporter(live))
                for entry, outcome in zip(live, outcomes, strict=True):
                    if outcome.error is None:
                        entry.future.set_result(outcome.result)
                    else:
                        entry.future.set_exception(RuntimeError(outcome.error))
                if self.on_batch is not None:
                    self.on_batch(live, time.perf_counter() - start)
        except EngineStopped as e:
            failed = scheduler.fail_all(e)
            log.error("rank 0: the engine stopped (%s); %d queued request(s) refused", e, failed)
            raise
        except Exception as e:  # a broken control group (a follower is gone)
            failed = scheduler.fail_all(EngineStopped(str(e)))
            log.error("rank 0: the control group failed (%s: %s); %d queued request(s) refused",
                      type(e).__name__, e, failed)  # fmt: skip
            raise EngineStopped(f"{type(e).__name__}: {e}") from e

    def follow(self) -> None:
        """Every other rank: execute what rank 0 sends until it says stop. Raises :class:`EngineStopped`."""
        while True:
            try:
                message = self._receive()
            except Exception as e:
                log.error("rank %d: no word from rank 0 (%s: %s); stopping", self.rank, type(e).__name__, e)
                raise EngineStopped(f"{type(e).__name__}: {e}") from e
            if message[0] == "stop":
                return
            if message[0] == "batch":
                self.execute(message[1], None)

    # ------------------------------------------------------------------------------ one batch
    def execute(self, requests: list[Any], progress: Callable[[float], None] | None) -> list[Outcome]:
        """Every rank, the same ``requests``: their outcomes, agreed by all ranks."""
        checks = [self._prepare(r) for r in requests]
        refused = self._agree(checks)
        outcomes = [Outcome(error=e) for e in refused]
        runnable = [i for i, e in enumerate(refused) if e is None]
        if runnable:
            self._run(requests, runnable, outcomes, progress)
        return outcomes

    def _run(self, requests: list[Any], idx: list[int], outcomes: list[Outcome], progress: Any) -> None:
        local: str | None = None
        results: list[Any] = []
        try:
            results = self.served.run([requests[i] for i in idx], self._on_step([requests[i] for i in idx], progress))
        except StepAborted:
            local = "aborted"
        except Exception as e:
            local = f"{type(e).__name__}: {e}"
            log.error("rank %d: the pipeline failed on %d request(s):\n%s", self.rank, len(idx), traceback.format_exc())
        errors = self._agree([local])[0]
        if errors is None:
            for i, result in zip(idx, results, strict=True):
                outcomes[i].result = result
            return
        if _broken(errors):
            raise EngineStopped(errors)
        if len(idx) > 1:  # find the request that fails: each alone
            log.warning("rank %d: a batch of %d failed (%s); running each alone", self.rank, len(idx), errors)
            for i in idx:
                self._run(requests, [i], outcomes, progress)
            return
        outcomes[idx[0]].error = f"the pipeline failed: {errors}"

    def _prepare(self, request: Any) -> str | None:
        try:
            for fault in self.faults:
                fault.check(self.rank, "prepare", [request.prompt])
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        return None

    def _on_step(self, requests: list[Any], progress: Callable[[float], None] | None) -> Callable[[float], None]:
        prompts = [r.prompt for r in requests]
        flag = torch.zeros(1, dtype=torch.int32)

        def on_step(fraction: float) -> None:
            error: Exception | None = None
            try:
                for fault in self.faults:
                    fault.check(self.rank, "denoise", prompts)
                if progress is not None:
                    progress(fraction)
            except Exception as e:  # reported to every rank first, then raised
                error = e
            if self.world > 1:
                flag.fill_(error is not None)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
            if error is not None:
                raise error
            if flag.item():
                raise StepAborted("another rank failed at this step")

        return on_step

    def _agree(self, errors: list[str | None]) -> list[str | None]:
        """Per item, the first rank's error (``"rank k: ..."``) or ``None`` when it failed on no rank."""
        if self.world == 1:
            return errors
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, errors, group=self.group)
        agreed: list[str | None] = []
        for i in range(len(errors)):
            failures = [(k, g[i]) for k, g in enumerate(gathered) if g[i] is not None and g[i] != "aborted"]
            if not failures and any(g[i] is not None for g in gathered):
                failures = [(k, g[i]) for k, g in enumerate(gathered) if g[i] is not None]
            agreed.append(None if not failures else "; ".join(f"rank {k}: {m}" for k, m in failures))
        return agreed

    def _reporter(self, entries: list[Entry]) -> Callable[[float], None]:
        def report(fraction: float) -> None:
            for entry in entries:
                if entry.progress is not None:
                    entry.progress(fraction)

        return report

    # ------------------------------------------------------------------------------ the channel
    def _send(self, message: tuple[Any, ...]) -> None:
        if self.world > 1:
            dist.broadcast_object_list([message], group=self.group, group_src=0)

    def _receive(self) -> tuple[Any, ...]:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, group=self.group, group_src=0)
        return box[0]


def _broken(error: str) -> bool:
    """Whether an error says the communicators are unusable (a timeout, a closed connection, a lost peer)."""
    text = error.lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "disterror",
                                   "distbackenderror", "distnetworkerror", "pair closure", "nccl"))  # fmt: skip
