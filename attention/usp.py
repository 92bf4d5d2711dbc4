"""USP: Ulysses inside each ulysses group, ring attention across the ring group.

On a ``ring × ulysses`` mesh the all-to-all inside a ulysses group turns ``[B, S/(U·R), H, D]`` into
``[B, S/R, H/U, D]``: the ulysses group's contiguous chunks form super-chunk ``ring_rank``. Ring
attention over the ring group (the ranks that hold the same heads) then covers the whole sequence,
and the inverse all-to-all restores ``[B, S/(U·R), H, D]``.
"""

from __future__ import annotations

import torch

from attention.backends import AttentionCall, select_backend
from attention.checks import check_qkv, needs_grad, resolve_scale
from attention.ring import ring_attention_core
from attention.ulysses import check_head_chunks, check_heads, ulysses_core
from xdit_core.mesh import ParallelMesh

Tensor = torch.Tensor


def usp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh: ParallelMesh,
    *,
    scale: float | None = None,
    backend: str = "auto",
    head_chunks: int = 1,
) -> Tensor:
    """Exact attention over a sequence sharded across ``mesh.sp_group``, by Ulysses × ring.

    q, k, v ``[B, S_local, H, D]``: this rank holds sequence chunk ``mesh.sp_rank`` (the order of
    ``shard_sequence``; all chunks the same length); ``H`` must be divisible by
    ``mesh.ulysses_size``. Returns ``[B, S_local, H, D]``. Ranks on different ``batch`` coordinates
    work on different samples and do not communicate here. ``head_chunks`` as in
    ``ulysses_attention``. Differentiable; gradients equal the single-device ones.
    """
    check_qkv(q, k, v, self_attention=True, what="usp_attention")
    check_heads(q.shape[2], mesh.ulysses_size, "usp_attention")
    scale = resolve_scale(scale, q.shape[-1])
    check_head_chunks(head_chunks, q, mesh.ulysses_size)
    chosen = select_backend(backend, AttentionCall(q.device, q.dtype, q.shape[-1], needs_grad(q, k, v)))

    def ring(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return ring_attention_core(q, k, v, mesh.ring_group, scale, chosen)

    return ulysses_core(q, k, v, mesh.ulysses_group, ring, head_chunks)
