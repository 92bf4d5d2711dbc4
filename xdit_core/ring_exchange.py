"""Ring exchange: rotate a block around a process group, asynchronously.

Rank ``r`` sends to ``r + 1`` and receives from ``r - 1`` (group ranks, modulo the group size). After
``s`` steps rank ``r`` holds the block that started on rank ``r - s``. ``start`` posts the transfer
and returns at once, so the caller computes on the current block while the next one travels;
``wait`` returns the received block.

One step is a single ``all_to_all_single`` whose only non-empty split goes to the next rank: the
same asynchronous collective path as Ulysses. ``batch_isend_irecv`` cost far more CPU per step
(docs/performance.md: a 4-rank ring call took 2.6 ms to issue with it, 1.0–1.2 ms without).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RingExchange:
    """One in-flight rotation step at a time over ``group``."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = group.size()
        self.rank = group.rank()
        self._pending: tuple[dist.Work, torch.Tensor, torch.Tensor] | None = None

    def start(self, block: torch.Tensor) -> None:
        """Post ``send(block) → next`` and ``recv ← prev`` (a block of the same shape and dtype)."""
        if self._pending is not None:
            raise RuntimeError("RingExchange.start called twice without wait()")
        if block.dim() == 0:
            raise ValueError("RingExchange.start needs a tensor with at least one dim")
        sent = block.contiguous()
        recv = torch.empty_like(sent)
        n = sent.shape[0]
        send_splits = [n if p == (self.rank + 1) % self.size else 0 for p in range(self.size)]
        recv_splits = [n if p == (self.rank - 1) % self.size else 0 for p in range(self.size)]
        work = dist.all_to_all_single(recv, sent, recv_splits, send_splits, group=self.group, async_op=True)
        self._pending = (work, sent, recv)

    def wait(self) -> torch.Tensor:
        """Wait for the posted step; returns the block received from the previous rank."""
        if self._pending is None:
            raise RuntimeError("RingExchange.wait called without start()")
        work, _sent, recv = self._pending  # _sent stays referenced until the transfer is done
        self._pending = None
        work.wait()
        return recv
