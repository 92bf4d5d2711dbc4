"""STDiT3's attention modules and their single-device processors.

A module holds the weights (names as in the checkpoint) and hands the computation to its
``processor``, so the sequence-parallel processors of :mod:`models.stdit.parallel` replace the
arithmetic without touching the weights. Tokens arrive as ``[B, T·S, C]`` in ``(t, s)`` order with
``T`` frames of ``S`` spatial positions (``S`` this rank's positions when sharded).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from einops import rearrange
from torch import nn

from attention.op import attention_compilable
from models.stdit.layers import RMSNorm

Tensor = torch.Tensor
Rope = Callable[..., Tensor]  # a models.stdit.layers.Rotation: rope(x, dim) rotates x along dim


class SelfAttentionProcessor(Protocol):
    def __call__(self, attn: SelfAttention, x: Tensor, *, frames: int, rope: Rope | None) -> Tensor: ...


class SelfAttention(nn.Module):
    """qkv projection, per-head RMSNorm of q and k, optional rotary embedding, softmax attention, proj.

    ``axis``: ``"spatial"`` (attention over the positions of each frame) or ``"temporal"`` (over the
    frames at each position).
    """

    def __init__(self, dim: int, num_heads: int, *, qk_norm: bool, axis: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.axis = num_heads, dim // num_heads, axis
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)
        self.processor: SelfAttentionProcessor = LocalSelfAttention()

    def project_qkv(self, x: Tensor, rope: Rope | None) -> tuple[Tensor, Tensor, Tensor]:
        """``x`` ``[B', L, C]`` → q, k, v ``[B', L, H, D]``: projected, q/k normalised, then rotated."""
        q, k, v = self.qkv(x).unflatten(-1, (3, -1, self.head_dim)).unbind(2)  # -1: this rank's heads under TP
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:  # rotate along L, in this layout
            q, k = rope(q, dim=1), rope(k, dim=1)
        return q, k, v

    def forward(self, x: Tensor, *, frames: int, rope: Rope | None = None) -> Tensor:
        return self.processor(self, x, frames=frames, rope=rope)


def attend(q: Tensor, k: Tensor, v: Tensor, backend: str = "auto") -> Tensor:
    """Softmax attention in the ``[B, L, H, D]`` layout, by the project's kernel choice (``backend``:
    ``"auto"``, the fastest that fits, or a name from ``attention.BACKEND_NAMES``); one custom op, no
    graph break, under ``torch.compile``."""
    return attention_compilable(q, k, v, backend=backend)[0]


def to_attention_layout(x: Tensor, frames: int, axis: str) -> Tensor:
    """``[B, T·S, C]`` → ``[(B T), S, C]`` (spatial) or ``[(B S), T, C]`` (temporal)."""
    if axis == "spatial":
        return rearrange(x, "b (t s) c -> (b t) s c", t=frames)
    return rearrange(x, "b (t s) c -> (b s) t c", t=frames)


def from_attention_layout(x: Tensor, batch: int, axis: str) -> Tensor:
    if axis == "spatial":
        return rearrange(x, "(b t) s c -> b (t s) c", b=batch)
    return rearrange(x, "(b s) t c -> b (t s) c", b=batch)


class LocalSelfAttention:
    """The single-device computation: every token of the sequence is on this device. ``backend``: the
    attention kernel (see :func:`attend`)."""

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend

    def __call__(self, attn: SelfAttention, x: Tensor, *, frames: int, rope: Rope | None) -> Tensor:
        seq = to_attention_layout(x, frames, attn.axis)
        out = attend(*attn.project_qkv(seq, rope), self.backend).flatten(2)
        return attn.proj(from_attention_layout(out, x.shape[0], attn.axis))


class CrossAttention(nn.Module):
    """Each token attends to its own sample's valid text tokens (``q_linear``, ``kv_linear``, ``proj``).

    Token-local: whatever subset of a sample's tokens a rank holds, it needs only that sample's text,
    so no processor here ever communicates.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.processor: Callable[[CrossAttention, Tensor, Tensor, Tensor | None], Tensor] = LocalCrossAttention()

    def forward(self, x: Tensor, y: Tensor, y_mask: Tensor | None) -> Tensor:
        """``x`` ``[B, N, C]``; ``y`` ``[B, L, C]`` text; ``y_mask`` ``[B, L]`` bool (True = valid) or None."""
        return self.processor(self, x, y, y_mask)


class LocalCrossAttention:
    """Key-masked attention per sample (the block-diagonal mask of the packed reference, unpacked)."""

    def __init__(self, backend: str = "auto") -> None:
        self.backend = backend

    def __call__(self, attn: CrossAttention, x: Tensor, y: Tensor, y_mask: Tensor | None) -> Tensor:
        q = attn.q_linear(x).unflatten(-1, (-1, attn.head_dim))  # -1: this rank's heads under TP
        k, v = attn.kv_linear(y).unflatten(-1, (2, -1, attn.head_dim)).unbind(2)
        out, _ = attention_compilable(q, k, v, key_mask=y_mask, backend=self.backend)  # no graph break
        return attn.proj(out.flatten(2))
