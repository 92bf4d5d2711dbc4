"""All-to-all through symmetric memory: each rank's copy kernels write its blocks into the peers' memory.

NCCL's all-to-all takes three passes over the data: the sender packs its blocks into a send buffer,
NCCL's kernel moves them, and the receiver reads them out of its receive buffer. On GPUs of one host
that can map each other's memory (NVLink), a :class:`PeerExchange` gives every rank of a group one
symmetric buffer (``torch.distributed._symmetric_memory``). The packing kernels then write each
block straight into the buffer of the rank that needs it, one barrier kernel tells every rank that
all blocks have arrived, and the receiver's kernels read them where they landed: one pass, no send
buffer, no separate transfer kernel. The copies move 8-byte words (``xdit_core.blocks``).

Why writes never overwrite what a peer still reads: the buffer holds two slots. Every exchange
ends with a barrier kernel. A *transient* exchange returns a view of the slot it filled, and the
next exchange fills the other slot; the slot is filled again two exchanges later at the earliest,
after the barrier of the exchange in between, which each rank's stream reaches only after the
kernels that read the slot (they must be issued before that exchange). A plain exchange copies its
result out and passes a second barrier, after which its slot is free again, and the next exchange
may use it. Transient exchanges therefore come in pairs (Ulysses: q/k/v there, the attention output
back), so every call leaves the slot order as it found it, and a captured CUDA graph replays the
slots the Python side expects.

CUDA only, and every pair of the group's GPUs must be able to map each other's memory.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from xdit_core.blocks import block_shape, block_words, pack_block

_ALIGN = 2**20  # slot sizes are rounded up to this many bytes (and so every slot starts aligned)


class PeerExchange:
    """A process group plus one symmetric buffer per rank, for all-to-alls by direct peer writes.

    Pass it wherever a Ulysses group is taken (``ulysses_attention``, ``all_to_all``), or build the
    mesh with ``ParallelMesh.build(..., peer_exchange=True)`` so that USP and the model adapters use
    it. ``size()`` and ``rank()`` are the group's. The buffer grows (a collective: every rank asks
    for the same size, as the sizes follow from the global shapes) and is then reused; it never
    grows during CUDA-graph capture (run the call once before capturing).
    """

    def __init__(self, group: dist.ProcessGroup, device: torch.device | str | None = None) -> None:
        if device is None:
            if not torch.cuda.is_available():
                raise ValueError("PeerExchange needs CUDA devices (symmetric memory); none is available")
            device = torch.device("cuda", torch.cuda.current_device())
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"PeerExchange needs CUDA devices (symmetric memory), got {device}")
        self.group = group
        self.device = device
        self._size, self._rank = group.size(), group.rank()
        self._slot_bytes = 0
        self._peers: list[torch.Tensor] = []  # every rank's buffer, as bytes, mapped on this device
        self._handle = None
        self._views: dict[tuple, torch.Tensor] = {}
        self._turn = 0  # which slot the next exchange writes

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank

    def _reserve(self, nbytes: int) -> None:
        if nbytes <= self._slot_bytes:
            return
        if torch.cuda.is_current_stream_capturing():
            raise ValueError(
                f"PeerExchange: a call needs {nbytes} bytes of symmetric memory, more than the {self._slot_bytes} "
                "reserved, while a CUDA graph is being captured; run the call once before capturing"
            )
        import torch.distributed._symmetric_memory as symm_mem

        torch.cuda.current_stream(self.device).synchronize()  # kernels in flight may still use the old buffer
        slot = -(-nbytes // _ALIGN) * _ALIGN
        buffer = symm_mem.empty(2 * slot, dtype=torch.uint8, device=self.device)
        self._handle = symm_mem.rendezvous(buffer, self.group.group_name)
        self._peers = [self._handle.get_buffer(p, (2 * slot,), torch.uint8) for p in range(self._size)]
        self._views = {}
        self._slot_bytes, self._turn = slot, 0

    def _view(self, rank: int, first: int, nbytes: int, dtype: torch.dtype, shape: list[int]) -> torch.Tensor:
        """``rank``'s buffer bytes ``[first, first + nbytes)`` as a ``shape`` tensor of ``dtype``; the
        views are kept, as a call makes the same ones every time (3 fewer tensor ops per block)."""
        key = (rank, first, nbytes, dtype, *shape)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self._peers[rank][first : first + nbytes].view(dtype).view(shape)
        return view

    def exchange(
        self,
        tensors: tuple[torch.Tensor, ...],
        scatter_dim: int,
        gather_dim: int,
        scatter_sizes: list[int],
        gather_sizes: list[int],
        transient: bool = False,
    ) -> torch.Tensor:
        """Rank ``p``'s ``scatter_sizes[r]`` entries of ``scatter_dim`` (of every tensor) to rank ``r``.

        Returns the received buffer ``[sum(gather_sizes), T, rest...]`` (``rest``: the dims other
        than ``gather_dim``, with ``scatter_sizes[this rank]`` entries of the scatter dim): the block
        of rank ``p`` first along dim 0 in rank order, the ``T`` tensors along dim 1, the same
        layout as the NCCL path of :func:`xdit_core.collectives.all_to_all`: a fresh tensor, or with
        ``transient=True`` a view of this rank's symmetric buffer, which kernels must read before the
        next exchange on this ``PeerExchange`` is issued (transient exchanges come in pairs: see the
        module notes). Arguments are checked by the caller.
        """
        x0 = tensors[0]
        count = len(tensors)

        def nbytes(rows: int, scatter: int) -> int:  # of one block
            return math.prod(block_shape(x0.shape, count, scatter_dim, gather_dim, rows, scatter)) * x0.element_size()

        me = self._rank
        total = [nbytes(sum(gather_sizes), s) for s in scatter_sizes]  # each rank's receive size
        recv_shape = block_shape(x0.shape, count, scatter_dim, gather_dim, sum(gather_sizes), scatter_sizes[me])
        if max(total) == 0:  # nothing to move on any rank
            return x0.new_empty(recv_shape)
        self._reserve(max(total))
        slot = self._turn * self._slot_bytes
        starts = [sum(scatter_sizes[:r]) for r in range(self._size)]
        before = sum(gather_sizes[:me])  # rows of the ranks before this one, in every receiver's buffer
        words = block_words(tensors, scatter_dim, gather_dim)
        for i in range(self._size):
            # Rank p writes to p, p + 1, ...: at every step each rank feeds a different receiver, so
            # no receiver's links are shared by several writers while others idle.
            r = (me + i) % self._size
            size, start = scatter_sizes[r], starts[r]
            if size and gather_sizes[me]:
                shape = block_shape(words[0].shape, count, scatter_dim, gather_dim, gather_sizes[me], size)
                first = slot + nbytes(before, size)
                dst = self._view(r, first, nbytes(gather_sizes[me], size), words[0].dtype, shape)
                pack_block(words, scatter_dim, gather_dim, start, size, dst)
        self._handle.barrier(channel=0)
        recv = self._view(me, slot, total[me], x0.dtype, recv_shape)
        if transient:
            self._turn ^= 1
            return recv
        recv = recv.clone()
        self._handle.barrier(channel=0)  # every rank has copied its block out: the slot is free again
        return recv
