"""USP: Ulysses inside each ulysses group, ring attention across the ring group.

On a ``ring × ulysses`` mesh the all-to-all inside a ulysses group turns each rank's chunk into the
group's *super-chunk* (its ranks' chunks, contiguous in sequence order) for this rank's heads. Ring
attention over the ring group (the ranks that hold the same heads) then covers the whole sequence,
and the inverse all-to-all restores ``[B, S_local, H, D]``. Uneven chunks give uneven super-chunks;
both stages handle them exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from attention.checks import check_sequence_call
from attention.joint import attend_layout
from attention.masking import Keep
from attention.ring import ring_attention_core
from attention.ulysses import ulysses_core
from xdit_core.collectives import Group, process_group_of
from xdit_core.mesh import ParallelMesh

Tensor = torch.Tensor


def usp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh: ParallelMesh,
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
    check_ranks: bool | None = None,
) -> Tensor | tuple[Tensor, ...]:
    """Exact attention over a sequence sharded across ``mesh.sp_group``, by Ulysses × ring.

    q, k, v ``[B, S_local, H, D]``: this rank holds sequence chunk ``mesh.sp_rank`` (the order of
    ``shard_sequence``). ``seq_len`` as in ``ulysses_attention`` (every length in ``sp_rank``
    order). Any head count. Returns ``[B, S_local, H, D]``; with ``joint`` (replicated tokens, as
    in ``ulysses_attention``) ``(out, joint_out)``; ``key_mask`` / ``joint_key_mask``,
    ``kv_seq_len`` / ``kv_replicated`` (cross-attention) and ``return_lse`` as there.
    ``check_ranks``: ``None`` follows ``mesh.check_ranks``. Ranks on different ``batch``
    coordinates work on different samples and do not communicate here. Differentiable; gradients
    equal the single-device ones.
    """
    check = mesh.check_ranks if check_ranks is None else check_ranks
    options = dict(
        seq_len=seq_len, kv_seq_len=kv_seq_len, kv_replicated=kv_replicated, key_mask=key_mask, joint=joint,
        joint_key_mask=joint_key_mask, scale=scale, backend=backend, return_lse=return_lse,
    )  # fmt: skip
    return usp_on_groups(q, k, v, mesh.sp_group, mesh.ulysses_transport, mesh.ring_group, check_ranks=check, **options)


_DEFAULTS = dict(
    seq_len=None,
    kv_seq_len=None,
    kv_replicated=False,
    key_mask=None,
    joint=None,
    joint_key_mask=None,
    scale=None,
    backend="auto",
    return_lse=False,
)  # usp_attention's keyword arguments, as it defaults them


def usp_on_groups(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sp_group: dist.ProcessGroup,
    ulysses: Group,
    ring_group: dist.ProcessGroup,
    *,
    check_ranks: bool,
    **options: Any,
) -> Tensor | tuple[Tensor, ...]:
    """:func:`usp_attention` on a mesh's three groups: ``sp_group`` (the sequence's ranks, ring-major),
    the ulysses transport (a group or its ``PeerExchange``) and the ring group of this rank; ``options``:
    :func:`usp_attention`'s keyword arguments (``seq_len``, ``joint``, ``return_lse``, ...)."""
    u, ring_size, ring_rank = process_group_of(ulysses).size(), ring_group.size(), ring_group.rank()
    unknown = sorted(set(options) - set(_DEFAULTS))
    if unknown:
        raise TypeError(f"usp_on_groups: unknown options {unknown}")
    options = {**_DEFAULTS, **options}
    return_lse = options["return_lse"]
    call = check_sequence_call(
        q, k, v, group=sp_group, group_rank=sp_group.rank(), check_ranks=check_ranks, what="usp_attention",
        extra_names=("mesh (ulysses, ring)",), extra_values=((u, ring_size),), **options,
    )  # fmt: skip

    def per_ring_rank(lengths: list[int]) -> list[int]:
        return [sum(lengths[r * u : (r + 1) * u]) for r in range(ring_size)]

    def mine(lengths: list[int]) -> list[int]:  # the lengths of this rank's ulysses group
        return lengths[ring_rank * u : (ring_rank + 1) * u]

    def attend(
        q: Tensor, k: Tensor, v: Tensor, lengths: list[int], kv_lengths: list[int] | None, keep: Keep | None
    ) -> tuple[Tensor, Tensor | None]:
        ring_kv = None if kv_lengths is None else per_ring_rank(kv_lengths)

        def ring(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
            return ring_attention_core(q, k, v, ring_group, call.scale, call.backend, ring_kv, keep, True)

        return ulysses_core(
            q, k, v, ulysses, ring, mine(lengths), None if kv_lengths is None else mine(kv_lengths),
            with_lse=return_lse,
        )  # fmt: skip

    return attend_layout(attend, q, k, v, sp_group, call, return_lse)
