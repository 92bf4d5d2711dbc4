"""Ring exchange: rotate a block around a process group with batched, asynchronous send/recv.

Rank ``r`` sends to ``r + 1`` and receives from ``r - 1`` (group ranks, modulo the group size). After
``s`` steps rank ``r`` holds the block that started on rank ``r - s``. ``start`` posts the transfer
and returns at once, so the caller computes on the current block while the next one travels; ``wait``
returns the received block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class RingExchange:
    """One in-flight rotation step at a time over ``group``."""

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        rank = dist.get_rank(group)
        self.next_rank = dist.get_global_rank(group, (rank + 1) % self.size)
        self.prev_rank = dist.get_global_rank(group, (rank - 1) % self.size)
        self._pending: tuple[list[dist.Work], torch.Tensor, torch.Tensor] | None = None

    def start(self, block: torch.Tensor) -> None:
        """Post ``send(block) → next`` and ``recv ← prev`` (a block of the same shape and dtype)."""
        if self._pending is not None:
            raise RuntimeError("RingExchange.start called twice without wait()")
        block = block.contiguous()
        recv = torch.empty_like(block)
        ops = [
            dist.P2POp(dist.isend, block, self.next_rank, self.group),
            dist.P2POp(dist.irecv, recv, self.prev_rank, self.group),
        ]
        self._pending = (dist.batch_isend_irecv(ops), block, recv)

    def wait(self) -> torch.Tensor:
        """Wait for the posted step; returns the block received from the previous rank."""
        if self._pending is None:
            raise RuntimeError("RingExchange.wait called without start()")
        works, _sent, recv = self._pending
        self._pending = None
        for work in works:
            work.wait()
        return recv
