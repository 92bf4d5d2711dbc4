"""The LSE merge: partial attention over disjoint key blocks combines into full attention.

Pure (one process). Inputs are float32; references are computed in float64 from the same values.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from dist_utils import ATOL, RTOL, excess
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import attention_with_lse, merge_attention
from attention.merge import merge_attention_

EXAMPLES = 30


def _full_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """Single-device ``(out [B, S, H, D], lse [B, H, S])`` in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    return out.transpose(1, 2), torch.logsumexp(scores, dim=-1)


@st.composite
def key_blocks(draw: st.DrawFn, s_k: int) -> list[list[int]]:
    """A random partition of ``range(s_k)`` into non-empty (not necessarily contiguous) blocks, in a random order."""
    n_blocks = draw(st.integers(1, min(s_k, 5)))
    keys = draw(st.permutations(range(s_k)))
    cuts = (
        sorted(draw(st.sets(st.integers(1, s_k - 1), min_size=n_blocks - 1, max_size=n_blocks - 1))) if s_k > 1 else []
    )
    blocks = [keys[a:b] for a, b in zip([0, *cuts], [*cuts, s_k], strict=True)]
    return draw(st.permutations(blocks))


def _merge_blocks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: list[list[int]], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    out = lse = None
    for block in blocks:
        idx = torch.tensor(block)
        block_out, block_lse = attention_with_lse(q, k[:, idx], v[:, idx], scale=scale, backend="math")
        if out is None:
            out, lse = block_out.float(), block_lse
        else:
            out, lse = merge_attention(out, lse, block_out, block_lse)
    assert out is not None and lse is not None
    return out, lse


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    batch=st.integers(1, 2),
    s_q=st.integers(1, 6),
    heads=st.integers(1, 3),
    head_dim=st.sampled_from([1, 3, 8, 16]),
    scale=st.sampled_from([None, 0.05, 1.0, 2.5]),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_merged_blocks_equal_full_attention(batch, s_q, heads, head_dim, scale, seed, data):
    s_k = data.draw(st.integers(1, 12), label="s_k")
    blocks = data.draw(key_blocks(s_k), label="blocks")
    assert sorted(i for b in blocks for i in b) == list(range(s_k))  # a partition of the keys
    scale = head_dim**-0.5 if scale is None else scale
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, s_q, heads, head_dim, generator=g)
    k, v = (torch.randn(batch, s_k, heads, head_dim, generator=g) for _ in range(2))

    out, lse = _merge_blocks(q, k, v, blocks, scale)
    ref_out, ref_lse = _full_reference(q, k, v, scale)
    assert out.dtype == lse.dtype == torch.float32
    assert excess(out, ref_out) <= 0, f"out off by {(out - ref_out).abs().max().item():.3g} for blocks {blocks}"
    assert excess(lse, ref_lse) <= 0, f"lse off by {(lse - ref_lse).abs().max().item():.3g} for blocks {blocks}"


def test_merged_blocks_are_differentiable_end_to_end():
    """Gradients through per-block attention and the merges equal the single-device gradients."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g).requires_grad_() for _ in range(3))
    blocks = [[4, 0], [2], [1, 3]]
    out, lse = _merge_blocks(q, k, v, blocks, 0.4)
    d_out, d_lse = torch.randn(out.shape, generator=g), torch.randn(lse.shape, generator=g)
    grads = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), (q, k, v))

    ref_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = _full_reference(*ref_in, 0.4)
    ref_grads = torch.autograd.grad((ref_out * d_out).sum() + (ref_lse * d_lse).sum(), ref_in)
    for name, a, r in zip("qkv", grads, ref_grads, strict=True):
        assert excess(a, r) <= 0, f"d{name} off by {(a - r).abs().max().item():.3g}"


def _merge_inputs(dtype: torch.dtype, seed: int = 0, b: int = 1, s: int = 2, h: int = 3, d: int = 2):
    g = torch.Generator().manual_seed(seed)
    out, block_out = (torch.randn(b, s, h, d, generator=g, dtype=dtype) for _ in range(2))
    lse, block_lse = (3 * torch.randn(b, h, s, generator=g, dtype=dtype) for _ in range(2))
    return out, lse, block_out, block_lse


def test_merge_gradcheck():
    """Numerical vs analytical Jacobian of ``merge_attention`` (inputs float64).

    ``merge_attention`` returns float32 by design, so the finite differences use ``eps=1e-3`` (float32
    rounding over ``eps`` would swamp the default ``1e-6``); a wrong gradient term is off by O(1).
    """
    inputs = [x.requires_grad_() for x in _merge_inputs(torch.float64)]
    assert torch.autograd.gradcheck(merge_attention, inputs, eps=1e-3, atol=1e-4, rtol=1e-3)


def _naive_merge(out, lse, block_out, block_lse):
    """The textbook formula with explicit exponentials (fine in float64 for moderate lse)."""
    new_lse = torch.log(torch.exp(lse) + torch.exp(block_lse))
    w = torch.exp(lse - new_lse).transpose(1, 2).unsqueeze(-1)
    w_b = torch.exp(block_lse - new_lse).transpose(1, 2).unsqueeze(-1)
    return w * out + w_b * block_out, new_lse


def test_merge_gradients_match_naive_formula():
    inputs = [x.requires_grad_() for x in _merge_inputs(torch.float32, seed=1, b=2, s=4, h=2, d=5)]
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    g = torch.Generator().manual_seed(2)
    d_out, d_lse = torch.randn(2, 4, 2, 5, generator=g), torch.randn(2, 2, 4, generator=g)

    out, lse = merge_attention(*inputs)
    grads = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), inputs)
    ref_out, ref_lse = _naive_merge(*ref_inputs)
    ref_grads = torch.autograd.grad((ref_out * d_out).sum() + (ref_lse * d_lse).sum(), ref_inputs)
    assert excess(out, ref_out) <= 0 and excess(lse, ref_lse) <= 0
    for name, a, r in zip(("out", "lse", "block_out", "block_lse"), grads, ref_grads, strict=True):
        assert excess(a, r) <= 0, f"d{name} off by {(a - r).abs().max().item():.3g}"


@pytest.mark.parametrize(
    "bad",
    [
        "block_out_shape",
        "block_lse_shape",
        "lse_layout",
        "lse_length",
    ],
)
def test_merge_rejects_mismatched_shapes(bad: str):
    out, lse, block_out, block_lse = _merge_inputs(torch.float32, b=2, s=4, h=3, d=5)
    if bad == "block_out_shape":
        block_out = block_out[:, :3]
    elif bad == "block_lse_shape":
        block_lse = block_lse[..., :3]
    elif bad == "lse_layout":  # [B, S, H] instead of [B, H, S]
        lse, block_lse = lse.transpose(1, 2), block_lse.transpose(1, 2)
    else:
        lse, block_lse = lse[..., :3], block_lse[..., :3]
    with pytest.raises(ValueError, match="merge_attention"):
        merge_attention(out, lse, block_out, block_lse)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    block_dtype=st.sampled_from([torch.float32, torch.bfloat16]),
    lse_shift=st.sampled_from([0.0, 30.0, -30.0]),
)
def test_in_place_merge_equals_merge(seed: int, block_dtype: torch.dtype, lse_shift: float):
    out, lse, block_out, block_lse = _merge_inputs(torch.float32, seed=seed, b=2, s=3, h=2, d=4)
    block_out, block_lse = block_out.to(block_dtype), block_lse + lse_shift
    expected_out, expected_lse = merge_attention(out, lse, block_out, block_lse)

    acc_out, acc_lse = out.clone(), lse.clone()
    assert merge_attention_(acc_out, acc_lse, block_out, block_lse) is None
    # Same formula; only the rounding of the fused in-place kernels may differ (a few float32 ulps).
    torch.testing.assert_close(acc_out, expected_out, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(acc_lse, expected_lse, atol=1e-6, rtol=1e-6)
    if lse_shift >= 0:  # the block carries real weight, so the accumulators must have changed in place
        assert not torch.equal(acc_out, out) and not torch.equal(acc_lse, lse)


@pytest.mark.parametrize("corruption", ["zero", "bf16"])
def test_corrupted_block_lse_is_caught_by_the_tolerance(corruption: str):
    """An LSE that is zero or rounded to bf16 breaks the merge far beyond the 1e-5 tolerance."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(2, 16, 3, 32, generator=g)
    k, v = (torch.randn(2, 48, 3, 32, generator=g) for _ in range(2))
    scale = 32**-0.5
    ref_out, _ = _full_reference(q, k, v, scale)

    out = lse = None
    for block in torch.arange(48).chunk(3):
        block_out, block_lse = attention_with_lse(q, k[:, block], v[:, block], scale=scale, backend="math")
        block_lse = torch.zeros_like(block_lse) if corruption == "zero" else block_lse.bfloat16().float()
        if out is None:
            out, lse = block_out.float(), block_lse
        else:
            out, lse = merge_attention(out, lse, block_out, block_lse)
    assert out is not None
    err = (out.double() - ref_out).abs().max().item()
    assert excess(out, ref_out, ATOL, RTOL) > 0
    assert err > 100 * ATOL, f"a {corruption} block LSE changed the output by only {err:.3g}"
