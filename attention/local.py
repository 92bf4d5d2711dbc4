"""``attention_with_lse``: single-device attention that also returns the log-sum-exp."""

from __future__ import annotations

import torch

from attention.backends import AttentionCall, Backend, select_backend
from attention.checks import check_qkv, needs_grad, resolve_scale
from attention.masking import Keep, block_keep, check_key_mask, keep_lists

Tensor = torch.Tensor


def lse_backward(
    backend: Backend, dlse: Tensor, q: Tensor, k: Tensor, lse: Tensor, scale: float, keep: Keep | None = None
) -> tuple[Tensor, Tensor]:
    """``(dq, dk)`` from a gradient of the lse ``[B, H, S_q]``, through the backend's own backward kernel.

    ``d lse_i / d s_ij = p_ij``, so the score gradient is ``p_ij * dlse_i``. A flash-style backward
    computes ``ds = p * (dout·v_j - rowsum(dout * out))``: with ``v_j = e_0`` for every key,
    ``dout_i = dlse_i e_0`` and ``out = 0`` that is exactly ``p_ij * dlse_i``. ``lse`` may be that
    of a larger key set (ring attention's merged lse): ``p`` is then the share of these keys.
    """
    v_unit = torch.zeros_like(k)
    v_unit[..., 0] = 1
    dout = torch.zeros_like(q)
    dout[..., 0] = dlse.transpose(1, 2).to(q.dtype)
    dq, dk, _ = masked_backward(backend, dout, q, k, v_unit, torch.zeros_like(q), lse, scale, keep)
    return dq, dk


class _AttentionWithLse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, backend):  # type: ignore[override]
        out, lse = backend.forward(q, k, v, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.backend = scale, backend
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        backend: Backend = ctx.backend
        dq = dk = dv = None
        if dout is not None:
            dq, dk, dv = backend.backward(dout, q, k, v, out, lse, ctx.scale)
        if dlse is not None:
            dq_l, dk_l = lse_backward(backend, dlse, q, k, lse, ctx.scale)
            dq = dq_l if dq is None else dq + dq_l
            dk = dk_l if dk is None else dk + dk_l
            dv = torch.zeros_like(v) if dv is None else dv
        return dq, dk, dv, None, None


def attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Softmax attention on one device, with its log-sum-exp.

    q ``[B, S_q, H, D]``, k and v ``[B, S_k, H, D]`` → ``out [B, S_q, H, D]`` (q's dtype) and
    ``lse [B, H, S_q]`` float32, natural log: ``lse = log Σ_k exp(scale · q·k)``. ``key_mask``
    ``[B, S_k]`` bool (True = attend): per-sample keys to leave out (a sample with none kept gets
    output 0, lse -inf). ``scale`` defaults to ``D**-0.5``. ``backend`` is ``"auto"`` (fastest that
    fits) or a name from ``BACKEND_NAMES``. Differentiable in q, k, v through both outputs.
    """
    check_qkv(q, k, v, what="attention_with_lse")
    keep = None
    if key_mask is not None:
        keep = keep_lists(check_key_mask(key_mask, k.shape[0], k.shape[1], "attention_with_lse"))
    scale = resolve_scale(scale, q.shape[-1])
    grad = needs_grad(q, k, v)
    chosen = select_backend(backend, AttentionCall(q.device, q.dtype, q.shape[-1], grad, keys=k.shape[1]))
    return run_masked(chosen, q, k, v, scale, block_keep(keep, 0, k.shape[1], q.device))


def run_masked(
    backend: Backend, q: Tensor, k: Tensor, v: Tensor, scale: float, keep: Keep | None
) -> tuple[Tensor, Tensor]:
    """:func:`run_backend` attending, per sample, only the keys ``keep[b]`` (all keys if ``keep`` is None)."""
    if keep is None:
        return run_backend(backend, q, k, v, scale)
    parts = [
        run_backend(backend, q[b : b + 1], k[b : b + 1].index_select(1, idx), v[b : b + 1].index_select(1, idx), scale)
        for b, idx in enumerate(keep)
    ]
    return torch.cat([o for o, _ in parts]), torch.cat([lse for _, lse in parts])


def masked_backward(
    backend: Backend,
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    scale: float,
    keep: Keep | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """``backend.backward`` for attention over the kept keys; masked keys get zero gradient."""
    if keep is None:
        return backend.backward(dout, q, k, v, out, lse, scale)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, idx in enumerate(keep):
        if idx.numel() == 0:
            continue
        s = slice(b, b + 1)
        k_b, v_b = k[s].index_select(1, idx), v[s].index_select(1, idx)
        dq_b, dk_b, dv_b = backend.backward(dout[s], q[s], k_b, v_b, out[s], lse[s], scale)
        dq[s] = dq_b
        dk[b].index_add_(0, idx, dk_b[0].to(dk.dtype))
        dv[b].index_add_(0, idx, dv_b[0].to(dv.dtype))
    return dq, dk, dv


def run_backend(backend: Backend, q: Tensor, k: Tensor, v: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` from an already chosen backend; differentiable when q, k or v need gradients.

    Empty work (no queries or no heads on this rank, or no keys) runs no kernel: the output is zeros
    and the lse ``-inf`` (with gradients: still connected to q, k and v, so the backward pass reaches
    every collective).
    """
    if q.shape[1] == 0 or q.shape[2] == 0 or k.shape[1] == 0:
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), device=q.device)
        if not needs_grad(q, k, v):
            return torch.zeros_like(q), lse
        # Both results depend on q, k and v (with zero gradients) on every rank, so the collectives
        # that follow take their autograd path on every rank alike.
        zero = (q.sum() + k.sum() + v.sum()) * 0
        return q * 0 + zero, lse + zero.float()
    if not needs_grad(q, k, v):
        return backend.forward(q, k, v, scale)
    return _AttentionWithLse.apply(q, k, v, scale, backend)
