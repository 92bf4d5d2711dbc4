"""``attention_with_lse`` and the backend registry: values, gradients, refusals.

CPU tests compare every CPU backend with ``F.scaled_dot_product_attention`` and ``torch.logsumexp``
(float64 references). GPU tests (marked ``gpu``) check every backend that accepts a bf16 call on the
current GPU by the flash-attention rule: its error against a float64 reference is at most twice that
of plain bf16 ``F.scaled_dot_product_attention``.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from dist_utils import excess
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import BACKEND_NAMES, AttentionCall, attention_with_lse, available_backends, select_backend
from attention.backends import BACKENDS, SHORT_KEYS, _auto_order

CPU = torch.device("cpu")
CUDA_BACKENDS = ("fa3", "cudnn", "fa2", "flash", "efficient")
CPU_BACKENDS = ("cpu_flash", "math", "auto")
EXAMPLES = 25


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [B, S_q, H, D], lse [B, H, S_q])`` by plain autograd-able torch ops, in the inputs' dtype."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    lse = torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q, k) * scale, dim=-1)
    return out.transpose(1, 2), lse


def _inputs(shape_q, shape_kv, dtype, seed, device=CPU):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=g)
    k, v = (torch.randn(shape_kv, generator=g) for _ in range(2))
    return tuple(x.to(device=device, dtype=dtype) for x in (q, k, v))


shapes = st.fixed_dictionaries(
    {
        "batch": st.integers(1, 2),
        "s_q": st.integers(1, 9),
        "s_k": st.integers(1, 9),
        "heads": st.integers(1, 3),
        "head_dim": st.sampled_from([1, 3, 8, 16, 40]),
        "scale": st.sampled_from([None, 0.05, 0.5, 2.0]),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def _draw(p: dict, dtype: torch.dtype):
    q, k, v = _inputs(
        (p["batch"], p["s_q"], p["heads"], p["head_dim"]),
        (p["batch"], p["s_k"], p["heads"], p["head_dim"]),
        dtype,
        p["seed"],
    )
    scale = p["head_dim"] ** -0.5 if p["scale"] is None else p["scale"]
    return q, k, v, p["scale"], scale


# ------------------------------------------------------------------------------------ CPU values
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=EXAMPLES, deadline=None)
@given(p=shapes)
def test_forward_matches_sdpa_and_logsumexp(backend: str, p: dict):
    q, k, v, scale_arg, scale = _draw(p, torch.float32)
    out, lse = attention_with_lse(q, k, v, scale=scale_arg, backend=backend)
    ref_out, ref_lse = reference(*(x.double() for x in (q, k, v)), scale)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == torch.float32
    assert excess(out, ref_out) <= 0, f"out off by {(out - ref_out).abs().max().item():.3g}"
    assert excess(lse, ref_lse) <= 0, f"lse off by {(lse - ref_lse).abs().max().item():.3g}"


def _float32_gradient_bounds(q, k, v, scale: float, d_out, d_lse) -> tuple[torch.Tensor, ...]:
    """Elementwise bounds on the float32 rounding error of ``dq, dk, dv`` (float64): ``γ_n · Σ|terms|``.

    Wilkinson's first-order bound for a sum, ``|fl(Σ t) − Σ t| ≤ n·u·Σ|t|``, applied to the backward's own
    formulas (``ds = p·(dp − δ + d_lse)``, ``dq = scale·ds·k``, ``dk = scale·dsᵀ·q``, ``dv = pᵀ·d_out``) with
    every factor replaced by its magnitude; ``p`` is weighted by ``1 + |s| + |lse|`` because ``exp`` turns
    an absolute rounding error in ``s − lse`` into that relative error in ``p``; ``n`` counts the roundings
    along the longest chain (a dot over D, sums over S_q and S_k, a few elementwise steps).
    """
    q, k, v, d_out, d_lse = (x.double() for x in (q, k, v, d_out, d_lse))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    p = torch.exp(s - lse) * (1 + s.abs() + lse.abs())
    dp = torch.einsum("bqhd,bkhd->bhqk", d_out.abs(), v.abs())
    ds = p * (dp + (p * dp).sum(-1, keepdim=True) + d_lse.abs().unsqueeze(-1))
    n = q.shape[-1] + q.shape[1] + k.shape[1] + 8
    u = torch.finfo(torch.float32).eps / 2
    return tuple(
        n * u * m
        for m in (
            scale * torch.einsum("bhqk,bkhd->bqhd", ds, k.abs()),
            scale * torch.einsum("bhqk,bqhd->bkhd", ds, q.abs()),
            torch.einsum("bhqk,bqhd->bkhd", p, d_out.abs()),
        )
    )


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("through", ["out", "lse", "both"])
@settings(max_examples=EXAMPLES // 2, deadline=None)
@given(p=shapes)
def test_gradients_match_autograd_reference(backend: str, through: str, p: dict):
    """dq, dk, dv with random upstream gradients on ``out``, on ``lse`` or on both, float32 against a
    float64 reference, each element within the float32 rounding bound of the backward's own sums
    (``_float32_gradient_bounds``): a fixed 1e-5 was exceeded where terms of size ~10 cancel (scores
    reach ±40 at scale 2.0 and D=40), while the bound scales with them. Over ~100 000 random gradient
    tensors (both CPU backends, every scale) the worst error was 0.31 of the bound; every example fails
    it with all gradients off by a relative 1e-4, or with the lse's gradient path cut (400 of 400).
    """
    q, k, v, scale_arg, scale = _draw(p, torch.float32)
    g = torch.Generator().manual_seed(p["seed"] + 1)
    d_out = torch.randn(q.shape, generator=g)
    d_lse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=g)

    def loss(out, lse):
        terms = {"out": (out * d_out.to(out.dtype)).sum(), "lse": (lse * d_lse.to(lse.dtype)).sum()}
        return terms["out"] + terms["lse"] if through == "both" else terms[through]

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    grads = torch.autograd.grad(loss(*attention_with_lse(*leaves, scale=scale_arg, backend=backend)), leaves)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    ref_grads = torch.autograd.grad(loss(*reference(*ref_leaves, scale)), ref_leaves, allow_unused=True)
    used_out, used_lse = (
        d if through in (part, "both") else torch.zeros_like(d) for part, d in (("out", d_out), ("lse", d_lse))
    )
    bounds = _float32_gradient_bounds(q, k, v, scale, used_out, used_lse)
    for name, a, r, bound in zip("qkv", grads, ref_grads, bounds, strict=True):
        r = torch.zeros_like(a, dtype=torch.float64) if r is None else r  # lse does not depend on v
        assert a.dtype == torch.float32 and a.shape == r.shape
        error = (a.double() - r).abs()
        worst = (error / bound).nan_to_num(nan=0.0, posinf=float("inf")).max().item() if error.numel() else 0.0
        assert (error <= bound).all(), f"d{name} off by {error.max().item():.3g}, {worst:.3g}× its rounding bound"


@pytest.mark.parametrize("backend", ["cpu_flash", "math"])
def test_float64_values_and_gradients(backend: str):
    """float64 inputs: ``out`` is float64-exact; the lse and gradients are float32-accurate.

    The lse is float32 by contract and the backward recomputes the probabilities from it, so the
    gradients carry its rounding (relative 2**-24 on the lse): tolerance 1e-6.
    """
    q, k, v = _inputs((2, 7, 3, 16), (2, 11, 3, 16), torch.float64, seed=5)
    g = torch.Generator().manual_seed(6)
    d_out, d_lse = torch.randn(q.shape, generator=g).double(), torch.randn(2, 3, 7, generator=g).double()
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = attention_with_lse(*leaves, scale=0.3, backend=backend)
    grads = torch.autograd.grad((out * d_out).sum() + (lse.double() * d_lse).sum(), leaves)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference(*ref_leaves, 0.3)
    ref_grads = torch.autograd.grad((ref_out * d_out).sum() + (ref_lse * d_lse).sum(), ref_leaves)
    assert out.dtype == torch.float64
    assert excess(out, ref_out, 1e-12, 1e-12) <= 0
    assert excess(lse, ref_lse, 1e-6, 1e-6) <= 0
    for name, a, r in zip("qkv", grads, ref_grads, strict=True):
        assert a.dtype == torch.float64
        assert excess(a, r, 1e-6, 1e-6) <= 0, f"d{name} off by {(a - r).abs().max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_output_dtypes(backend: str, dtype: torch.dtype):
    """``out`` keeps the input dtype; ``lse`` is always float32 (the documented contract)."""
    q, k, v = _inputs((1, 4, 2, 8), (1, 5, 2, 8), dtype, seed=0)
    out, lse = attention_with_lse(q, k, v, backend=backend)
    assert out.dtype == dtype
    assert lse.dtype == torch.float32


# ---------------------------------------------------------------------------------- registry
@pytest.mark.parametrize("needs_grad", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [1, 64, 128, 512])
def test_available_backends_on_cpu(dtype: torch.dtype, needs_grad: bool, head_dim: int):
    names = available_backends(AttentionCall(CPU, dtype, head_dim, needs_grad))
    assert names == ["cpu_flash", "math"]
    assert select_backend("auto", AttentionCall(CPU, dtype, head_dim, needs_grad)).name == "cpu_flash"


def _reason_lines(message: str) -> dict[str, str]:
    return dict(re.findall(r"^  (\w+): (.+)$", message, flags=re.MULTILINE))


@pytest.mark.parametrize("needs_grad", [False, True])
@pytest.mark.parametrize("name", CUDA_BACKENDS)
def test_explicit_backend_that_cannot_run_lists_every_reason(name: str, needs_grad: bool):
    q, k, v = _inputs((1, 3, 2, 8), (1, 3, 2, 8), torch.float32, seed=0)
    if needs_grad:
        q.requires_grad_()
    with pytest.raises(ValueError) as info:
        attention_with_lse(q, k, v, backend=name)
    message = str(info.value)
    reasons = _reason_lines(message)
    assert sorted(reasons) == sorted(BACKEND_NAMES), message  # every backend, each once
    assert message.count(f"  {name}: ") == 1
    assert next(iter(reasons)) == name, "the requested backend's reason comes first"
    assert reasons["cpu_flash"] == reasons["math"] == "would run"
    for other in CUDA_BACKENDS:
        assert reasons[other] != "would run", message
    assert name in message.splitlines()[0] and "cpu" in message.splitlines()[0]
    if name in ("flash", "efficient"):
        assert "CUDA" in reasons[name]
    if needs_grad and name in ("fa3", "fa2"):
        assert "forward only" in reasons[name]
    # The same refusal comes straight from the registry.
    with pytest.raises(ValueError, match=re.escape(message.splitlines()[0])):
        select_backend(name, AttentionCall(CPU, torch.float32, 8, needs_grad))


@pytest.mark.parametrize("name", ["nope", "", "Math", "cuda"])
def test_unknown_backend_name_lists_valid_names(name: str):
    q = torch.randn(1, 2, 1, 4)
    with pytest.raises(ValueError, match="unknown attention backend") as info:
        attention_with_lse(q, q, q, backend=name)
    for valid in (*BACKEND_NAMES, "auto"):
        assert valid in str(info.value)


def _bad_cases() -> dict[str, tuple]:
    x = torch.randn(1, 3, 2, 8)
    return {
        "rank3": (x[0], x[0], x[0], {}),
        "rank5": (x[None], x[None], x[None], {}),
        "dtype_mismatch": (x, x.double(), x.double(), {}),
        "kv_shape_mismatch": (x, x, x[:, :2], {}),
        "kv_head_dim_mismatch": (x, x, x[..., :4], {}),
        "qk_heads_mismatch": (x, x[:, :, :1], x[:, :, :1], {}),
        "qk_head_dim_mismatch": (x, x[..., :4], x[..., :4], {}),
        "qk_batch_mismatch": (x, torch.cat([x, x]), torch.cat([x, x]), {}),
        "integer_dtype": (x.long(), x.long(), x.long(), {}),
        "empty": (x[:, :0], x, x, {}),
        "nan_scale": (x, x, x, {"scale": float("nan")}),
        "inf_scale": (x, x, x, {"scale": float("inf")}),
        "bool_scale": (x, x, x, {"scale": True}),
        "not_a_tensor": (x.tolist(), x, x, {}),
    }


@pytest.mark.parametrize("case", sorted(_bad_cases()))
@pytest.mark.parametrize("backend", ["auto", "math", "cpu_flash"])
def test_bad_inputs_raise_value_error(case: str, backend: str):
    q, k, v, kwargs = _bad_cases()[case]
    with pytest.raises(ValueError):
        attention_with_lse(q, k, v, backend=backend, **kwargs)


def test_cross_attention_rows_are_independent_of_other_queries():
    """Each query row only sees the keys: attending a subset of the queries gives the same rows."""
    q, k, v = _inputs((2, 9, 3, 8), (2, 4, 3, 8), torch.float32, seed=9)
    for backend in ("cpu_flash", "math"):
        out, lse = attention_with_lse(q, k, v, backend=backend)
        sub_out, sub_lse = attention_with_lse(q[:, 2:5], k, v, backend=backend)
        assert excess(sub_out, out[:, 2:5]) <= 0 and excess(sub_lse, lse[..., 2:5]) <= 0


# ------------------------------------------------------------------------ bf16: flash-attn rule
# The flash-attention rule (reference/attention.md §4): a backend's error against a float64 reference
# (computed from the same bf16 inputs) is at most twice the error of plain bf16
# ``F.scaled_dot_product_attention`` against it, plus a small slack. The checks take a device: the
# ``gpu`` tests run them for every backend the GPU accepts; on CPU they run for cpu_flash and math,
# which also keeps the checks themselves exercised where no GPU is present.
RULE_B, RULE_S_Q, RULE_S_K, RULE_H = 2, 300, 517, 5
REL_EPS = 1e-3  # the slack of the 2x rule: relative to max |reference| (forward), or a relative-norm error


def _rule_inputs(head_dim: int, seed: int, device: torch.device):
    return _inputs(
        (RULE_B, RULE_S_Q, RULE_H, head_dim), (RULE_B, RULE_S_K, RULE_H, head_dim), torch.bfloat16, seed, device
    )


def _backend_or_skip(name: str, head_dim: int, needs_grad: bool, device: torch.device) -> None:
    call = AttentionCall(device, torch.bfloat16, head_dim, needs_grad)
    if name not in available_backends(call):
        why = next(b.why_not(call) for b in BACKENDS if b.name == name)
        pytest.skip(f"{name} cannot run bf16 head_dim={head_dim}{' with grad' if needs_grad else ''}: {why}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref.double()).abs().max().item()


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _bf16_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain bf16 ``F.scaled_dot_product_attention`` (whatever kernel PyTorch picks) in ``[B, S, H, D]``."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    return out.transpose(1, 2)


def check_forward_rule(name: str, head_dim: int, device: torch.device) -> None:
    _backend_or_skip(name, head_dim, False, device)
    q, k, v = _rule_inputs(head_dim, 0, device)
    scale = head_dim**-0.5
    with torch.no_grad():
        ref_out, ref_lse = reference(*(x.double() for x in (q, k, v)), scale)
        base_out = _bf16_sdpa(q, k, v, scale)
        out, lse = attention_with_lse(q, k, v, backend=name)
    _sync(device)
    assert out.shape == q.shape and out.dtype == torch.bfloat16 and out.device == q.device
    assert lse.shape == (RULE_B, RULE_H, RULE_S_Q) and lse.dtype == torch.float32
    err, base_err = _max_err(out, ref_out), _max_err(base_out, ref_out)
    bound = 2 * base_err + REL_EPS * ref_out.abs().max().item()
    assert err <= bound, f"{name} D={head_dim}: out max error {err:.3g} > 2 x bf16 sdpa's {base_err:.3g} + eps"
    lse_err = _max_err(lse, ref_lse)
    assert lse_err <= 1e-2, f"{name} D={head_dim}: lse max error {lse_err:.3g}"


def _reference_grads(q, k, v, scale, d_out, d_lse):
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out, lse = reference(*leaves, scale)
    loss = (out * d_out.double()).sum() if d_out is not None else 0
    loss = loss + ((lse * d_lse.double()).sum() if d_lse is not None else 0)
    return torch.autograd.grad(loss, leaves, allow_unused=True)


def _bf16_baseline_grads(q, k, v, scale, d_out, d_lse):
    """The same gradients from plain bf16 ``F.scaled_dot_product_attention`` (float32 sums of bf16 parts).

    ``d lse_i / d s_ij = p_ij``, so the lse part is ``dq_i = scale dlse_i (P K)_i`` (attention with
    values = keys) and ``dk = P^T G`` with ``G_i = scale dlse_i q_i`` (the dv of attention for the
    output gradient ``G``); both come from bf16 sdpa.
    """
    grads = [torch.zeros(x.shape, dtype=torch.float32, device=x.device) for x in (q, k, v)]
    if d_out is not None:
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        parts = torch.autograd.grad(_bf16_sdpa(*leaves, scale), leaves, d_out)
        grads = [g + p.float() for g, p in zip(grads, parts, strict=True)]
    if d_lse is not None:
        w = scale * d_lse.transpose(1, 2).unsqueeze(-1)  # [B, S_q, H, 1] float32
        with torch.no_grad():
            grads[0] = grads[0] + w * _bf16_sdpa(q, k, k, scale).float()
        v_leaf = v.detach().clone().requires_grad_()
        (dk,) = torch.autograd.grad(_bf16_sdpa(q, k, v_leaf, scale), v_leaf, (w * q.float()).to(q.dtype))
        grads[1] = grads[1] + dk.float()
    return grads


def check_backward_rule(name: str, head_dim: int, through: str, device: torch.device) -> None:
    _backend_or_skip(name, head_dim, True, device)
    q, k, v = _rule_inputs(head_dim, 1, device)
    scale = head_dim**-0.5
    g = torch.Generator().manual_seed(2)
    d_out = torch.randn(q.shape, generator=g).to(device, torch.bfloat16) if through != "lse" else None
    d_lse = torch.randn(RULE_B, RULE_H, RULE_S_Q, generator=g).to(device) if through != "out" else None

    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = attention_with_lse(*leaves, backend=name)
    loss = (out.float() * d_out.float()).sum() if d_out is not None else 0
    loss = loss + ((lse * d_lse).sum() if d_lse is not None else 0)
    grads = torch.autograd.grad(loss, leaves)
    _sync(device)
    ref = _reference_grads(q, k, v, scale, d_out, d_lse)
    base = _bf16_baseline_grads(q, k, v, scale, d_out, d_lse)
    for i, (grad_name, a) in enumerate(zip(("dq", "dk", "dv"), grads, strict=True)):
        assert a.shape == leaves[i].shape and a.dtype == torch.bfloat16, grad_name
        if ref[i] is None:  # only the lse was differentiated: it does not depend on v
            assert a.abs().max().item() == 0, f"{name}: {grad_name} must be zero"
            continue
        err, base_err = _rel_err(a, ref[i]), _rel_err(base[i], ref[i])
        assert err <= 2 * base_err + REL_EPS, (
            f"{name} D={head_dim} through {through}: {grad_name} relative error {err:.3g} "
            f"> 2 x bf16 sdpa's {base_err:.3g} + {REL_EPS}"
        )


@pytest.mark.parametrize("name", ["cpu_flash", "math"])
def test_cpu_bf16_forward_rule(name: str):
    check_forward_rule(name, 64, CPU)


@pytest.mark.parametrize("through", ["out", "lse", "both"])
@pytest.mark.parametrize("name", ["cpu_flash", "math"])
def test_cpu_bf16_backward_rule(name: str, through: str):
    check_backward_rule(name, 64, through, CPU)


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GPU_NAMES = [n for n in BACKEND_NAMES if n != "cpu_flash"]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("head_dim", [64, 128, 512])  # 512: the VAE's one head (forward-only kernels)
@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_forward_bf16_flash_attention_rule(name: str, head_dim: int):
    check_forward_rule(name, head_dim, torch.device("cuda", torch.cuda.current_device()))


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("through", ["out", "lse", "both"])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("name", GPU_NAMES)
def test_gpu_backward_bf16_flash_attention_rule(name: str, head_dim: int, through: str):
    check_backward_rule(name, head_dim, through, torch.device("cuda", torch.cuda.current_device()))


def test_auto_prefers_cudnn_to_fa3_on_short_key_sequences():
    """Measured on an H200 (benchmarks/kernel_probe.py): FA3 wins on long sequences, cuDNN on short ones."""
    call = AttentionCall(torch.device("cuda"), torch.bfloat16, 72, False, keys=SHORT_KEYS - 1)
    names = [b.name for b in _auto_order(call)]
    assert names.index("cudnn") < names.index("fa3") and sorted(names) == sorted(BACKEND_NAMES)
    long = AttentionCall(torch.device("cuda"), torch.bfloat16, 72, False, keys=SHORT_KEYS)
    assert [b.name for b in _auto_order(long)] == list(BACKEND_NAMES)
