"""Input validation shared by the attention entry points.

Checks depend only on values every rank has in the same form (shapes, dtypes, devices, mesh
degrees), so a bad call raises the same ``ValueError`` on every rank before any collective.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from attention.backends import AttentionCall, Backend, select_backend
from attention.joint import check_joint
from attention.masking import check_masks
from xdit_core.collectives import resolve_lengths


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, self_attention: bool, what: str) -> None:
    """q ``[B, S_q, H, D]``, k and v ``[B, S_k, H, D]``; ``self_attention`` also needs ``S_q == S_k``."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{what}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{what}: {name} must be [B, S, H, D] (4-D), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{what}: {name} must be floating point, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{what}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{what}: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{what}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"{what}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head_dim ([B, S, H, D])"
        )
    if self_attention and q.shape[1] != k.shape[1]:
        raise ValueError(
            f"{what}: local sequence lengths differ: q has {q.shape[1]}, k/v have {k.shape[1]} "
            "(sequence-parallel q, k, v are chunks of one sequence)"
        )
    # A sequence-parallel rank may hold no tokens (fewer tokens than ranks); every other size must be >= 1.
    empty = [n for i, n in enumerate((*q.shape, *k.shape)) if n == 0 and not (self_attention and i in (1, 5))]
    if empty:
        raise ValueError(f"{what}: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


@dataclass(frozen=True)
class SequenceCall:
    """What a validated sequence-parallel call needs: every rank's length, the scale, the kernel."""

    joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    lengths: list[int]
    scale: float
    backend: Backend


def check_sequence_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group_size: int,
    group_rank: int,
    seq_len: int | Sequence[int] | None,
    key_mask: torch.Tensor | None,
    joint: object,
    joint_key_mask: torch.Tensor | None,
    scale: float | None,
    backend: str,
    what: str,
) -> SequenceCall:
    """Validate a Ulysses / ring / USP call before any collective and choose its kernel."""
    check_qkv(q, k, v, self_attention=True, what=what)
    checked = None if joint is None else check_joint(joint, q, what)
    lengths = resolve_lengths(seq_len, group_size, group_rank, q.shape[1], what)
    check_masks(key_mask, joint_key_mask, checked, q.shape[0], sum(lengths), what)
    grad = needs_grad(q, k, v, *(checked or ()))
    chosen = select_backend(backend, AttentionCall(q.device, q.dtype, q.shape[-1], grad))
    return SequenceCall(checked, lengths, resolve_scale(scale, q.shape[-1]), chosen)
