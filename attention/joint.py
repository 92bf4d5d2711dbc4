"""Joint tokens: tokens replicated on every rank (FLUX's text) joining sequence-parallel attention.

Each rank takes its ``tensor_split`` share of the joint tokens and puts it in front of its own
chunk; the attention then runs on that uneven layout. So every joint token is a key exactly once
(on the rank that holds its share) and a query on exactly one rank, for any ulysses × ring split;
the joint outputs are all-gathered, bitwise identical on every rank. Gradients of the replicated
joint tensors are the full single-device gradients on every rank (``shard`` / ``gather``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from attention.masking import Keep, keep_lists

if TYPE_CHECKING:
    from attention.checks import SequenceCall
from xdit_core.collectives import gather, shard, split_sizes

Tensor = torch.Tensor
# (q, k, v, every rank's query tokens, every rank's key tokens or None (replicated keys),
#  per sample the kept key positions or None) -> (out, lse or None when the lse is not wanted)
Attend = Callable[[Tensor, Tensor, Tensor, list[int], list[int] | None, Keep | None], tuple[Tensor, Tensor | None]]


def check_joint(joint: object, q: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """``joint = (q, k, v)`` of shape ``[B, J, H, D]``, ``J >= 1``, matching q's batch, heads, dim, dtype, device."""
    if not (isinstance(joint, (tuple, list)) and len(joint) == 3):
        raise ValueError(f"{what}: joint must be a (q, k, v) tuple of [B, J, H, D] tensors, got {type(joint).__name__}")
    for name, x in zip(("q", "k", "v"), joint, strict=True):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{what}: joint {name} must be a [B, J, H, D] tensor")
        if x.shape != joint[0].shape or x.shape[1] < 1:
            raise ValueError(f"{what}: joint q, k, v must share one shape [B, J>=1, H, D], got {tuple(x.shape)}")
        if x.shape[0] != q.shape[0] or x.shape[2:] != q.shape[2:] or x.dtype != q.dtype or x.device != q.device:
            raise ValueError(
                f"{what}: joint {name} {tuple(x.shape)} {x.dtype} {x.device} must match q {tuple(q.shape)} "
                f"{q.dtype} {q.device} in batch, heads, head_dim, dtype and device"
            )
    return joint[0], joint[1], joint[2]


def attend_layout(
    attend: Attend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    call: SequenceCall,
    return_lse: bool,
) -> Tensor | tuple[Tensor, ...]:
    """Run ``attend`` on this rank's chunk, with the joint tokens and the key masks folded in.

    ``group`` is the group the sequence is sharded over; ``call`` the validated call (every rank's
    lengths, host masks ``[B, keys]`` and ``[B, J]``, True = attend). Returns ``out [B, S_local, H, D]``
    (or ``(out, lse [B, H, S_local])`` with ``return_lse``); with joint tokens ``(out, joint_out
    [B, J, H, D])`` (or ``(out, joint_out, lse, joint_lse [B, H, J])``).
    """
    joint, key_mask, joint_key_mask = call.joint, call.key_mask, call.joint_key_mask
    if joint is None:
        keep = None if key_mask is None else keep_lists(key_mask)
        out, lse = attend(q, k, v, call.lengths, call.kv_lengths, keep)
        return (out, lse) if return_lse else out
    world, rank = group.size(), group.rank()
    joint_sizes = split_sizes(joint[0].shape[1], world)
    mine = [shard(x, group, dim=1) for x in joint]  # this rank's share of the joint tokens
    q, k, v = (torch.cat((j, x), dim=1) for j, x in zip(mine, (q, k, v), strict=True))
    layout = [j + n for j, n in zip(joint_sizes, call.lengths, strict=True)]
    keep = None
    if key_mask is not None or joint_key_mask is not None:
        batch = q.shape[0]
        km = key_mask if key_mask is not None else torch.ones(batch, sum(call.lengths), dtype=torch.bool)
        jm = joint_key_mask if joint_key_mask is not None else torch.ones(batch, joint[0].shape[1], dtype=torch.bool)
        pieces, seq_at, joint_at = [], 0, 0
        for j, n in zip(joint_sizes, call.lengths, strict=True):  # each rank's block: [its joint share; its chunk]
            pieces += [jm[:, joint_at : joint_at + j], km[:, seq_at : seq_at + n]]
            joint_at, seq_at = joint_at + j, seq_at + n
        keep = keep_lists(torch.cat(pieces, dim=1))
    out, lse = attend(q, k, v, layout, layout, keep)
    mine_split = [joint_sizes[rank], out.shape[1] - joint_sizes[rank]]
    joint_out, out = out.split(mine_split, dim=1)
    joint_out = gather(joint_out, group, dim=1, sizes=joint_sizes)
    if not return_lse:
        return out, joint_out
    joint_lse, lse = lse.split(mine_split, dim=2)
    return out, joint_out, lse, gather(joint_lse.contiguous(), group, dim=2, sizes=joint_sizes)
