"""USP: Ulysses inside each ulysses group, ring attention across the ring group.

On a ``ring × ulysses`` mesh the all-to-all inside a ulysses group turns each rank's chunk into the
group's *super-chunk* (its ranks' chunks, contiguous in sequence order) for this rank's heads. Ring
attention over the ring group (the ranks that hold the same heads) then covers the whole sequence,
and the inverse all-to-all restores ``[B, S_local, H, D]``. Uneven chunks give uneven super-chunks;
both stages handle them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from attention.backends import AttentionCall, select_backend
from attention.checks import check_qkv, needs_grad, resolve_scale
from attention.joint import attend_layout, check_joint
from attention.masking import Keep, check_masks
from attention.ring import ring_attention_core
from attention.ulysses import ulysses_core
from xdit_core.collectives import resolve_lengths
from xdit_core.mesh import ParallelMesh

Tensor = torch.Tensor


def usp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh: ParallelMesh,
    *,
    seq_len: int | Sequence[int] | None = None,
    key_mask: Tensor | None = None,
    joint: tuple[Tensor, Tensor, Tensor] | None = None,
    joint_key_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Exact attention over a sequence sharded across ``mesh.sp_group``, by Ulysses × ring.

    q, k, v ``[B, S_local, H, D]``: this rank holds sequence chunk ``mesh.sp_rank`` (the order of
    ``shard_sequence``). ``seq_len`` as in ``ulysses_attention`` (every length in ``sp_rank``
    order). Any head count. Returns ``[B, S_local, H, D]``; with ``joint`` (replicated tokens, as
    in ``ulysses_attention``) ``(out, joint_out)``; ``key_mask`` / ``joint_key_mask`` as there.
    Ranks on different ``batch`` coordinates work on different samples and do not communicate here.
    Differentiable; gradients equal the single-device ones.
    """
    check_qkv(q, k, v, self_attention=True, what="usp_attention")
    joint = None if joint is None else check_joint(joint, q, "usp_attention")
    lengths = resolve_lengths(seq_len, mesh.sp_size, mesh.sp_rank, q.shape[1], "usp_attention")
    check_masks(key_mask, joint_key_mask, joint, q.shape[0], sum(lengths), "usp_attention")
    scale = resolve_scale(scale, q.shape[-1])
    grad = needs_grad(q, k, v, *(joint or ()))
    chosen = select_backend(backend, AttentionCall(q.device, q.dtype, q.shape[-1], grad))
    u = mesh.ulysses_size

    def attend(q: Tensor, k: Tensor, v: Tensor, lengths: list[int], keep: Keep | None) -> Tensor:
        ring_lengths = [sum(lengths[r * u : (r + 1) * u]) for r in range(mesh.ring_size)]

        def ring(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            return ring_attention_core(q, k, v, mesh.ring_group, scale, chosen, ring_lengths, keep)

        return ulysses_core(q, k, v, mesh.ulysses_group, ring, lengths[mesh.ring_rank * u : (mesh.ring_rank + 1) * u])

    return attend_layout(attend, q, k, v, mesh.sp_group, lengths, key_mask, joint, joint_key_mask)
