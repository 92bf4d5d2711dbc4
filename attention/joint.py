"""Joint tokens: tokens replicated on every rank (FLUX's text) joining sequence-parallel attention.

Each rank takes its ``tensor_split`` share of the joint tokens and puts it in front of its own
chunk; the attention then runs on that uneven layout. So every joint token is a key exactly once
(on the rank that holds its share) and a query on exactly one rank, for any ulysses × ring split;
the joint outputs are all-gathered, bitwise identical on every rank. Gradients of the replicated
joint tensors are the full single-device gradients on every rank (``shard`` / ``gather``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from xdit_core.collectives import gather, shard, split_sizes

Tensor = torch.Tensor
Attend = Callable[[Tensor, Tensor, Tensor, list[int]], Tensor]  # (q, k, v, every rank's length) -> out


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


def attend_with_joint(
    attend: Attend,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    joint: tuple[Tensor, Tensor, Tensor],
    group: dist.ProcessGroup,
    lengths: list[int],
) -> tuple[Tensor, Tensor]:
    """``(out [B, S_local, H, D], joint_out [B, J, H, D])``: ``attend`` over the sequence plus the joint tokens.

    ``group`` is the group the sequence is sharded over, ``lengths`` every rank's sequence length.
    """
    world, rank = group.size(), group.rank()
    joint_sizes = split_sizes(joint[0].shape[1], world)
    mine = [shard(x, group, dim=1) for x in joint]  # this rank's share of the joint tokens
    q, k, v = (torch.cat((j, x), dim=1) for j, x in zip(mine, (q, k, v), strict=True))
    out = attend(q, k, v, [j + n for j, n in zip(joint_sizes, lengths, strict=True)])
    joint_out, out = out.split([joint_sizes[rank], out.shape[1] - joint_sizes[rank]], dim=1)
    return out, gather(joint_out, group, dim=1, sizes=joint_sizes)
