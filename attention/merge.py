"""Merging partial attention results over disjoint key blocks, via their log-sum-exp."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def merge_attention(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> tuple[Tensor, Tensor]:
    """Combine attention over two disjoint key sets into attention over their union.

    ``out``/``block_out`` ``[B, S, H, D]``, ``lse``/``block_lse`` ``[B, H, S]``. Returns float32
    ``(out, lse)``; cast ``out`` to the input dtype once, after the last merge. Stable form:
    ``out -= sigmoid(lse_b - lse) * (out - out_b)``, ``lse = logaddexp(lse, lse_b)``. A side with no
    keys (``lse = -inf``, out 0) contributes nothing, also when both have none. Differentiable.
    """
    if out.shape != block_out.shape or lse.shape != block_lse.shape:
        raise ValueError(
            f"merge_attention: shapes differ: out {tuple(out.shape)} vs {tuple(block_out.shape)}, "
            f"lse {tuple(lse.shape)} vs {tuple(block_lse.shape)}"
        )
    b, s, h, _ = out.shape
    if lse.shape != (b, h, s):
        raise ValueError(f"merge_attention: lse must be [B, H, S] = {(b, h, s)}, got {tuple(lse.shape)}")
    lse, block_lse = lse.float(), block_lse.float()
    weight = _weight(lse, block_lse)
    out = out.float()
    out = out - weight * (out - block_out.float())
    return out, torch.logaddexp(lse, block_lse)


def _weight(lse: Tensor, block_lse: Tensor) -> Tensor:
    """``sigmoid(lse_b - lse)`` as ``[B, S, H, 1]``; 0 where neither side has keys (-inf - -inf)."""
    diff = torch.nan_to_num(block_lse - lse, nan=float("-inf"), posinf=float("inf"), neginf=float("-inf"))
    return torch.sigmoid(diff).transpose(1, 2).unsqueeze(-1)


def merge_attention_(out: Tensor, lse: Tensor, block_out: Tensor, block_lse: Tensor) -> None:
    """In-place :func:`merge_attention` into float32 accumulators ``out`` and ``lse`` (not differentiable).

    ``out += sigmoid(lse_b - lse) * (out_b - out)`` as one ``lerp_`` over the large tensor.
    """
    out.lerp_(block_out.to(out.dtype), _weight(lse, block_lse))
    lse.copy_(torch.logaddexp(lse, block_lse))
