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
from xdit_core.collectives import Group, all_to_all, process_group_of, shard, split_sizes
from xdit_core.peer import PeerExchange

Tensor = torch.Tensor
Inner = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]  # (q, k, v) -> (out, lse)


def ulysses_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Group,
    inner: Inner,
    lengths: list[int],
    kv_lengths: list[int] | None,
    with_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Head-scatter q/k/v over ``group``, run ``inner`` on ``[B, sum(lengths), H_rank, D]``, scatter back.

    ``lengths``: every group rank's number of query tokens, in rank order (this rank's is q's
    length); ``kv_lengths``: the same for k/v (``lengths`` itself for self-attention), or ``None``
    when k/v are replicated (every rank then keeps its own heads of them). ``inner`` returns
    ``(out, lse)``; the result is ``(out [B, S_local, H, D], lse [B, H, S_local])``, the lse ``None``
    unless ``with_lse``.
    Self-attention without the lse uses one exchange each way; with a ``PeerExchange`` those
    exchanged tensors are views of its buffer (``transient``): ``inner`` reads q/k/v before the
    output exchange, and the output is copied out below.
    """
    world = group.size()
    if world == 1:
        out, lse = inner(q, k, v)
        return out, lse if with_lse else None
    heads = split_sizes(q.shape[2], world)
    self_attention = kv_lengths == lengths and k.shape == q.shape
    transient = self_attention and not with_lse  # exactly two exchanges: a transient pair

    def scatter_heads(tensors: tuple[Tensor, ...], sizes: list[int]) -> tuple[Tensor, ...]:
        return all_to_all(
            tensors, group, scatter_dim=2, gather_dim=1, scatter_sizes=heads, gather_sizes=sizes,
            transient=transient, check_ranks=False,
        )  # fmt: skip

    if self_attention:
        q, k, v = scatter_heads((q, k, v), lengths)
    else:
        (q,) = scatter_heads((q,), lengths)
        if kv_lengths is None:  # replicated: this rank's heads, their gradients all-gathered back
            k, v = shard(k, process_group_of(group), dim=2), shard(v, process_group_of(group), dim=2)
        else:
            k, v = scatter_heads((k, v), kv_lengths)
    out, lse = inner(q, k, v)
    out = all_to_all(
        (out,), group, scatter_dim=1, gather_dim=2, scatter_sizes=lengths, gather_sizes=heads,
        transient=transient, check_ranks=False,
    )[0]  # fmt: skip
    if not out.is_contiguous() or isinstance(group, PeerExchange):  # (NCCL, B = 1: placed contiguously already)
        # autograd does not follow a copy through integer words
        out = out.contiguous() if out.requires_grad else copy_words(out.new_empty(out.shape), out)
    if not with_lse:
        return out, None
    lse = all_to_all(
        (lse.transpose(1, 2),), group, scatter_dim=1, gather_dim=2, scatter_sizes=lengths, gather_sizes=heads,
        check_ranks=False,
    )[0]  # fmt: skip
    return out, lse.transpose(1, 2)


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: Group,
    *,
    seq_len: int | Sequence[int] | None = None,
    kv_seq_len: int | Sequence[int] | None = None,
    kv_replicated: bool = False,
    key_mask: Tensor | None = None,
    joint: tuple[Tensor, Tensor, Tensor] | None = None,
    joint_key_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    check_ranks: bool = True,
) -> Tensor | tuple[Tensor, ...]:
    """Exact attention over a sequence sharded across ``group``, by all-to-all over heads.

    q, k, v ``[B, S_local, H, D]``: rank ``i`` of ``group`` holds chunk ``i`` of the sequence.
    ``seq_len``: ``None`` (all chunks have this rank's length), the global length ``L`` (chunks laid
    out as ``shard_sequence`` does, ``torch.tensor_split``; a rank may hold none), or every rank's
    length. Any head count (uneven head split). Returns ``[B, S_local, H, D]``; with ``joint``
    (``(q, k, v)`` ``[B, J, H, D]`` replicated on every rank, e.g. text tokens) returns
    ``(out, joint_out [B, J, H, D])``, the joint tokens attending and attended to exactly once
    (``attention.joint``). ``key_mask`` ``[B, L_kv]`` bool (True = attend), the same on every rank,
    masks keys per sample (``joint_key_mask`` ``[B, J]`` the joint tokens); a query with no kept key
    gets output 0. Differentiable; gradients equal the single-device ones.

    Cross-attention (keys/values not laid out like the queries): ``kv_seq_len`` gives k/v's layout
    as ``seq_len`` gives q's (``[B, S_kv_local, H, D]`` chunks of ``L_kv`` keys), or
    ``kv_replicated=True`` says every rank holds all ``L_kv`` keys/values (their gradients are then
    the full single-device ones on every rank). ``return_lse=True`` also returns the log-sum-exp
    ``lse [B, H, S_local]`` float32 of this rank's queries (after the joint output: ``(out,
    joint_out, lse, joint_lse)``), to merge with further keys by ``merge_attention``.
    ``check_ranks``: first agree with the group's ranks that all make this call (one small
    collective per new call signature; ``xdit_core.agreement``); ``False`` skips it.

    ``group``: a process group (NCCL all-to-alls) or a :class:`~xdit_core.PeerExchange` over one
    (direct writes into the peers' GPU memory; faster on GPUs joined by NVLink).
    """
    process_group = process_group_of(group)
    call = check_sequence_call(
        q, k, v, group=process_group, group_rank=group.rank(), seq_len=seq_len, kv_seq_len=kv_seq_len,
        kv_replicated=kv_replicated, key_mask=key_mask, joint=joint, joint_key_mask=joint_key_mask, scale=scale,
        backend=backend, return_lse=return_lse, check_ranks=check_ranks, what="ulysses_attention",
    )  # fmt: skip

    def attend(
        q: Tensor, k: Tensor, v: Tensor, lengths: list[int], kv_lengths: list[int] | None, keep: Keep | None
    ) -> tuple[Tensor, Tensor | None]:
        def local(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            return run_masked(call.backend, q, k, v, call.scale, block_keep(keep, 0, k.shape[1], q.device))

        return ulysses_core(q, k, v, group, local, lengths, kv_lengths, with_lse=return_lse)

    return attend_layout(attend, q, k, v, process_group, call, return_lse)
