"""Input validation shared by the attention entry points.

Checks depend only on values every rank has in the same form (shapes, dtypes, devices, mesh
degrees), so a bad call raises the same ``ValueError`` on every rank before any collective.
"""

from __future__ import annotations

import math

import torch


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
