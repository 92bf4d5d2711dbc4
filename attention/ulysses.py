"""Ulysses attention: trade the sequence shard for a head shard with one all-to-all, and back.

``[B, S/P, H, D]`` on each of ``P`` ranks → one all-to-all carrying q, k and v together →
``[B, S, H/P, D]`` → local attention over the whole sequence for ``H/P`` heads → one all-to-all of
the output → ``[B, S/P, H, D]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from attention.backends import AttentionCall, Backend, select_backend
from attention.checks import check_qkv, needs_grad, resolve_scale
from attention.local import run_backend
from xdit_core.collectives import all_to_all

Tensor = torch.Tensor


def check_heads(num_heads: int, ulysses: int, what: str) -> None:
    if num_heads % ulysses:
        fits = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"{what}: {num_heads} heads do not split over a ulysses degree of {ulysses}; "
            f"use a ulysses degree in {fits} (with ring for the rest of the ranks)"
        )


def ulysses_core(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, inner: Callable[[Tensor, Tensor, Tensor], Tensor]
) -> Tensor:
    """Head-scatter q/k/v over ``group``, run ``inner`` on ``[B, S_group, H/P, D]``, scatter back."""
    if dist.get_world_size(group) == 1:
        return inner(q, k, v)
    q, k, v = all_to_all((q, k, v), group, scatter_dim=2, gather_dim=1)
    out = inner(q, k, v)
    return all_to_all((out,), group, scatter_dim=1, gather_dim=2)[0]


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact attention over a sequence sharded across ``group``, by all-to-all over heads.

    q, k, v ``[B, S_local, H, D]``: rank ``i`` of ``group`` holds chunk ``i`` of the sequence (all
    chunks the same length); ``H`` must be divisible by the group size. Returns
    ``[B, S_local, H, D]``. Differentiable; gradients equal the single-device ones.
    """
    check_qkv(q, k, v, self_attention=True, what="ulysses_attention")
    check_heads(q.shape[2], dist.get_world_size(group), "ulysses_attention")
    scale = resolve_scale(scale, q.shape[-1])
    chosen: Backend = select_backend(backend, AttentionCall(q.device, q.dtype, q.shape[-1], needs_grad(q, k, v)))
    return ulysses_core(q, k, v, group, lambda q, k, v: run_backend(chosen, q, k, v, scale)[0])
