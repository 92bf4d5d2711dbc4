"""Ulysses attention: trade the sequence shard for a head shard with one all-to-all, and back.

``[B, S_local, H, D]`` on each of ``P`` ranks → one all-to-all carrying q, k and v together →
``[B, S, H_rank, D]`` → local attention over the whole sequence for this rank's heads → one
all-to-all of the output → ``[B, S_local, H, D]``.

Uneven shapes are exact, with no padding: rank ``p`` receives heads ``tensor_split(H, P)[p]`` (24
heads on 5 ranks: 5, 5, 5, 5, 4; one head on 2 ranks: 1, 0) and contributes its own number of
tokens, so the exchange moves exactly the real tokens. q, k and v arrive as strided views of one
receive buffer (``[S, 3, B, H_rank, D]``), which the kernels read directly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from attention.checks import check_sequence_call
from attention.joint import attend_layout
from attention.local import run_masked
from attention.masking import Keep, block_keep
from xdit_core.blocks import copy_words
from xdit_core.collectives import Group, all_to_all, split_sizes
from xdit_core.peer import PeerExchange

Tensor = torch.Tensor
Inner = Callable[[Tensor, Tensor, Tensor], Tensor]


def ulysses_core(q: Tensor, k: Tensor, v: Tensor, group: Group, inner: Inner, lengths: list[int]) -> Tensor:
    """Head-scatter q/k/v over ``group``, run ``inner`` on ``[B, sum(lengths), H_rank, D]``, scatter back.

    ``lengths``: every group rank's number of tokens, in rank order (this rank's is q's length).
    With a ``PeerExchange`` the exchanged tensors are views of its buffer (``transient``): ``inner``
    reads q/k/v before the output exchange, and the output is copied out below.
    """
    world = group.size()
    if world == 1:
        return inner(q, k, v)
    heads = split_sizes(q.shape[2], world)
    q, k, v = all_to_all(
        (q, k, v), group, scatter_dim=2, gather_dim=1, scatter_sizes=heads, gather_sizes=lengths, transient=True
    )
    out = inner(q, k, v)
    out = all_to_all(
        (out,), group, scatter_dim=1, gather_dim=2, scatter_sizes=lengths, gather_sizes=heads, transient=True
    )[0]
    if out.is_contiguous() and not isinstance(group, PeerExchange):  # NCCL, B = 1: placed contiguously already
        return out
    if out.requires_grad:  # autograd does not follow a copy through integer words
        return out.contiguous()
    return copy_words(torch.empty(out.shape, dtype=out.dtype, device=out.device), out)


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Group,
    *,
    seq_len: int | Sequence[int] | None = None,
    key_mask: Tensor | None = None,
    joint: tuple[Tensor, Tensor, Tensor] | None = None,
    joint_key_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over a sequence sharded across ``group``, by all-to-all over heads.

    q, k, v ``[B, S_local, H, D]``: rank ``i`` of ``group`` holds chunk ``i`` of the sequence.
    ``seq_len``: ``None`` (all chunks have this rank's length), the global length ``L`` (chunks laid
    out as ``shard_sequence`` does, ``torch.tensor_split``; a rank may hold none), or every rank's
    length. Any head count (uneven head split). Returns ``[B, S_local, H, D]``; with ``joint``
    (``(q, k, v)`` ``[B, J, H, D]`` replicated on every rank, e.g. text tokens) returns
    ``(out, joint_out [B, J, H, D])``, the joint tokens attending and attended to exactly once
    (``attention.joint``). ``key_mask`` ``[B, L]`` bool (True = attend), the same on every rank,
    masks keys per sample (``joint_key_mask`` ``[B, J]`` the joint tokens); a query with no kept key
    gets output 0. Differentiable; gradients equal the single-device ones.

    ``group``: a process group (NCCL all-to-alls) or a :class:`~xdit_core.PeerExchange` over one
    (direct writes into the peers' GPU memory; faster on GPUs joined by NVLink).
    """
    call = check_sequence_call(
        q, k, v, group_size=group.size(), group_rank=group.rank(), seq_len=seq_len, key_mask=key_mask,
        joint=joint, joint_key_mask=joint_key_mask, scale=scale, backend=backend, what="ulysses_attention",
    )  # fmt: skip

    def attend(q: Tensor, k: Tensor, v: Tensor, lengths: list[int], keep: Keep | None) -> Tensor:
        def local(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return run_masked(call.backend, q, k, v, call.scale, block_keep(keep, 0, k.shape[1], q.device))[0]

        return ulysses_core(q, k, v, group, local, lengths)

    process_group = group.group if isinstance(group, PeerExchange) else group
    return attend_layout(attend, q, k, v, process_group, call.lengths, key_mask, call.joint, joint_key_mask)
