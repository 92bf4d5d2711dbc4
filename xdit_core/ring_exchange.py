"""Ring exchange: rotate blocks around a process group with batched, asynchronous send/recv.

Rank ``r`` sends to ``r + 1`` and receives from ``r - 1`` (group ranks, modulo the group size). After
``s`` steps rank ``r`` holds the blocks that started on rank ``r - s``. ``start`` posts the transfer
and returns at once, so the caller computes on the current blocks while the next ones travel;
``wait`` returns the received blocks. Several tensors (k and v) travel in one batched call.
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
        self._pending: tuple[list[dist.Work], tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]] | None = None

    def start(self, *blocks: torch.Tensor) -> None:
        """Post ``send(blocks) → next`` and ``recv ← prev`` (blocks of the same shapes and dtypes)."""
        if self._pending is not None:
            raise RuntimeError("RingExchange.start called twice without wait()")
        if not blocks:
            raise ValueError("RingExchange.start needs at least one tensor")
        sent = tuple(b.contiguous() for b in blocks)
        recv = tuple(torch.empty_like(b) for b in sent)
        ops = [dist.P2POp(dist.isend, b, self.next_rank, self.group) for b in sent]
        ops += [dist.P2POp(dist.irecv, b, self.prev_rank, self.group) for b in recv]
        self._pending = (dist.batch_isend_irecv(ops), sent, recv)

    def wait(self) -> tuple[torch.Tensor, ...]:
        """Wait for the posted step; returns the blocks received from the previous rank."""
        if self._pending is None:
            raise RuntimeError("RingExchange.wait called without start()")
        works, _sent, recv = self._pending  # _sent stays referenced until the transfer is done
        self._pending = None
        for work in works:
            work.wait()
        return recv
