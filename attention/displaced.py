"""Displaced (stale-KV) attention: fresh local keys, the other ranks' keys from the previous step. Inexact.

DistriFusion's patch parallelism (arXiv 2402.19481) for a sequence sharded over the ranks of a group:
each rank's queries attend to its own keys/values computed *this* step and to the other ranks'
keys/values of the *previous* step, which travelled while that step computed. The result is exact
attention over that union of keys (merged by log-sum-exp, :mod:`attention.merge`), but not over this
step's keys of the whole sequence: the method is approximate by design and opt-in.

* :func:`displaced_attention`: the attention itself, on one rank, no communication.
* :class:`StaleExchange`: one attention layer's exchange between the ranks: :meth:`~StaleExchange.send`
  starts an all-gather of this step's local k/v (``async_op=True``) right after they are computed
  and keeps its handle; :meth:`~StaleExchange.receive` waits for it where the next step needs it
  (the same layer, one step later) and returns the other ranks' k/v.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from attention.local import attention_with_lse
from attention.merge import merge_attention

Tensor = torch.Tensor

# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def displaced_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    stale: tuple[Tensor, Tensor] | None,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Attention of this rank's queries over its fresh keys and the other ranks' stale ones.

    q ``[B, S_local, H, D]``; k, v ``[B, S_local, H, D]``: this rank's keys/values of this step
    (anything local: its tokens, replicated joint tokens); ``stale``: ``(k, v)`` ``[B, S_stale, H, D]``,
    the other ranks' keys/values of the previous step (:meth:`StaleExchange.receive`), or ``None``.
    Returns ``[B, S_local, H, D]`` in q's dtype: softmax attention over the union of both key sets,
    computed as two local attentions merged by their log-sum-exp (float32). ``scale`` defaults to
    ``D**-0.5``; ``backend`` as in :func:`~attention.local.attention_with_lse`. The stale keys carry
    no gradient back to the step that made them (inference).
    """
    out, lse = attention_with_lse(q, k, v, scale=scale, backend=backend)
    if stale is None or stale[0].shape[1] == 0:
        return out
    stale_out, stale_lse = attention_with_lse(q, stale[0], stale[1], scale=scale, backend=backend)
    merged, _ = merge_attention(out, lse, stale_out, stale_lse)
    return merged.to(q.dtype)


class StaleExchange:
    """One attention layer's k/v, sent to the other ranks of ``group`` one step and received the next.

    Uneven chunks: rank ``p`` holds ``lengths[p]`` tokens (every rank passes the same ``lengths``, in
    group-rank order, e.g. from the layout its model's boundary agreed on). The k/v travel as one
    buffer ``[2, B, max(lengths), H, D]`` per rank, padded to the longest chunk, in one all-gather
    (``all_gather_single``; NCCL and gloo take only equal sizes); the receiver cuts each rank's real
    ``lengths[p]`` rows out of it, so padding is never attended. Between :meth:`send` and
    :meth:`receive` the receive buffer ``[P, 2, B, max(lengths), H, D]`` is held: the memory of the
    stale keys (per layer: ``2 · B · P · max(lengths) · H · D`` elements).
    """

    def __init__(self, group: dist.ProcessGroup) -> None:
        self.group = group
        self._work: dist.Work | None = None
        self._received: Tensor | None = None  # [P, 2, B, rows, H, D] while in flight
        self._lengths: list[int] = []

    @property
    def in_flight(self) -> bool:
        """Whether a :meth:`send` awaits its :meth:`receive`."""
        return self._received is not None

    def send(self, k: Tensor, v: Tensor, lengths: Sequence[int]) -> None:
        """Start the all-gather of this rank's k, v ``[B, lengths[rank], H, D]`` (asynchronous; returns at once).

        Every rank of the group must call it, in the same order relative to its other collectives on
        the group. The previous exchange must have been received.
        """
        world, rank = self.group.size(), self.group.rank()
        lengths = [int(n) for n in lengths]
        if self._received is not None:
            raise RuntimeError("StaleExchange.send: the previous exchange was not received yet")
        if k.shape != v.shape or k.dim() != 4:
            raise ValueError(f"StaleExchange.send: k and v must share one shape [B, S, H, D], got {k.shape}, {v.shape}")
        if len(lengths) != world or min(lengths) < 0 or lengths[rank] != k.shape[1]:
            raise ValueError(
                f"StaleExchange.send: lengths {lengths} must give the {world} ranks' token counts, "
                f"this rank's (rank {rank}) being {k.shape[1]}"
            )
        rows = max(lengths)
        if k.shape[1] == rows:
            kv = torch.stack((k, v))
        else:  # padded to the longest chunk (the padding is never read)
            kv = k.new_zeros((2, k.shape[0], rows, *k.shape[2:]))
            kv[0, :, : k.shape[1]] = k
            kv[1, :, : k.shape[1]] = v
        received = kv.new_empty((world * 2, *kv.shape[1:]))
        self._work = _all_gather_single(received, kv, group=self.group, async_op=True)
        self._received, self._lengths = received.unflatten(0, (world, 2)), lengths

    def receive(self) -> tuple[Tensor, Tensor]:
        """Wait for the exchange in flight; the other ranks' k, v ``[B, sum of their lengths, H, D]`` in rank order."""
        if self._received is None:
            raise RuntimeError("StaleExchange.receive: nothing was sent")
        if self._work is not None:
            self._work.wait()
        received, lengths, me = self._received, self._lengths, self.group.rank()
        self._work, self._received = None, None
        others = [p for p in range(len(lengths)) if p != me]
        k = torch.cat([received[p, 0, :, : lengths[p]] for p in others], dim=1)
        v = torch.cat([received[p, 1, :, : lengths[p]] for p in others], dim=1)
        return k, v

    def drop(self, *, wait: bool = True) -> None:
        """Forget the exchange in flight, first waiting for it (``wait``; every rank sent it). ``wait=False``
        after a failure, when the other ranks may not have sent theirs: the process group keeps the buffers
        until the transfer ends."""
        if wait and self._work is not None:
            self._work.wait()
        self._work, self._received = None, None
