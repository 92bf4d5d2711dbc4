"""FLUX's attention processor on a sequence-parallel mesh, beside the adapter that installs it.

The processor has the call signature of diffusers' ``FluxAttnProcessor`` and computes the same
function; only the attention itself goes through :func:`~attention.usp.usp_attention` (Ulysses ×
ring). The per-call token layout (which tokens each rank holds, :class:`JointLayout`) is read from
the model's :class:`~xdit_core.context.CallContext`, which the adapter's boundary
(:mod:`models.flux.adapter`) fills from its split for the duration of each call; nothing travels
through diffusers' ``joint_attention_kwargs``. Under ``torch.compile`` the attention is one custom op
(:mod:`attention.op`), so a whole block compiles without a graph break; the layout's lengths are then
constants of the compiled graph, like its shapes (a new image size recompiles).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.models.embeddings import apply_rotary_emb

from attention.op import usp_attention_compilable
from xdit_core.context import CallContext
from xdit_core.mesh import ParallelMesh

Tensor = torch.Tensor


@dataclass(frozen=True)
class JointLayout:
    """Where a joint (text + image) sequence lives on the ranks of the mesh.

    ``text_lens[p]`` / ``image_lens[p]``: the text and image tokens sequence-parallel rank ``p``
    holds, in ``sp_rank`` order. Every rank's local sequence is its text tokens followed by its
    image tokens. ``replicated_text``: every rank holds all text tokens (``text_lens`` then lists
    the full text length for every rank). ``samples[b]``: the samples batch rank ``b`` holds (a
    step cache reduces its decision over them).
    """

    text_lens: tuple[int, ...]
    image_lens: tuple[int, ...]
    replicated_text: bool
    samples: tuple[int, ...]

    @property
    def local_lens(self) -> list[int]:
        """Every rank's local sequence length (text + image) when the text is sharded."""
        return [t + i for t, i in zip(self.text_lens, self.image_lens, strict=True)]


def _parallel_attention(
    q: Tensor, k: Tensor, v: Tensor, mesh: ParallelMesh, layout: JointLayout, backend: str
) -> Tensor:
    """Attention over the joint sequence spread as the call's layout says; q, k, v ``[B, T + I_local, H, D]``
    (one op in a ``torch.compile`` graph: :func:`~attention.op.usp_attention_compilable`)."""
    rank = mesh.sp_rank
    text_len = layout.text_lens[rank]
    if q.shape[1] != text_len + layout.image_lens[rank]:
        raise ValueError(
            f"FluxSequenceParallelProcessor: rank {rank} holds {q.shape[1]} tokens, but the layout says "
            f"{text_len} text + {layout.image_lens[rank]} image"
        )
    if not layout.replicated_text:
        return usp_attention_compilable(q, k, v, mesh, seq_len=layout.local_lens, backend=backend)
    split = (text_len, q.shape[1] - text_len)
    (qt, qi), (kt, ki), (vt, vi) = (x.split(split, dim=1) for x in (q, k, v))
    image_lens = list(layout.image_lens)
    out, text_out = usp_attention_compilable(qi, ki, vi, mesh, seq_len=image_lens, joint=(qt, kt, vt), backend=backend)
    return torch.cat((text_out, out), dim=1)


class FluxSequenceParallelProcessor:
    """Drop-in for diffusers' ``FluxAttnProcessor`` on a sequence-parallel mesh.

    Double-stream blocks pass image tokens as ``hidden_states`` and text tokens as
    ``encoder_hidden_states``; single-stream blocks pass the concatenation ``[text; image]``. Both
    hold this rank's tokens as the call's :class:`JointLayout` (in ``context``) describes;
    ``image_rotary_emb`` covers exactly them.
    """

    def __init__(self, mesh: ParallelMesh, context: CallContext[JointLayout], *, backend: str = "auto") -> None:
        self.mesh = mesh
        self.context = context
        self.backend = backend

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """The attention of this rank's tokens ``[B, T + I_local, H, D]`` (q, k, v after RoPE): exact, over the mesh."""
        return _parallel_attention(q, k, v, self.mesh, self.context.layout, self.backend)

    def __call__(
        self,
        attn: Any,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        image_rotary_emb: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        if attention_mask is not None:
            raise ValueError("FluxSequenceParallelProcessor: attention_mask is not supported (FLUX passes none)")
        joint_stream = encoder_hidden_states is not None
        if attn.fused_projections:
            q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)) for x in (q, k, v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if joint_stream:
            if attn.fused_projections:
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq, ek, ev = (x.unflatten(-1, (-1, attn.head_dim)) for x in (eq, ek, ev))
            eq, ek = attn.norm_added_q(eq), attn.norm_added_k(ek)
            q, k, v = torch.cat((eq, q), dim=1), torch.cat((ek, k), dim=1), torch.cat((ev, v), dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        out = self.attend(q, k, v)
        out = out.flatten(2, 3).to(q.dtype)
        if not joint_stream:
            return out
        text_len = encoder_hidden_states.shape[1]
        text_out, out = out.split((text_len, out.shape[1] - text_len), dim=1)
        out = attn.to_out[1](attn.to_out[0](out.contiguous()))
        return out, attn.to_add_out(text_out.contiguous())
