"""Key masks on one device: attending only the kept keys equals masked SDPA; edge cases; bad masks."""

from __future__ import annotations

import pytest
import torch
from dist_utils import excess, random_key_mask, reference_attention
from hypothesis import given, settings
from hypothesis import strategies as st

from attention import attention_with_lse, merge_attention
from attention.masking import block_keep, check_masks, keep_lists


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 3),
    s_q=st.integers(1, 7),
    s_k=st.integers(1, 9),
    heads=st.integers(1, 3),
    backend=st.sampled_from(["cpu_flash", "math"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_masked_attention_matches_masked_sdpa(batch, s_q, s_k, heads, backend, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, s_q, heads, 8, generator=g)
    k, v = (torch.randn(batch, s_k, heads, 8, generator=g) for _ in range(2))
    mask = random_key_mask(batch, s_k, g)
    dout = torch.randn(batch, s_q, heads, 8, generator=g)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, lse = attention_with_lse(*leaves, key_mask=mask, backend=backend)
    out.backward(dout)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref = reference_attention(*ref_leaves, None, mask)
    ref.backward(dout)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 8**-0.5
    ref_lse = torch.logsumexp(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    assert excess(out, ref) <= 0 and excess(lse, ref_lse) <= 0
    for a, r in zip(leaves, ref_leaves, strict=True):
        assert excess(a.grad, r.grad) <= 0
    assert torch.all(leaves[1].grad[~mask] == 0) and torch.all(leaves[2].grad[~mask] == 0)  # masked keys: no grad


def test_sample_with_no_kept_key_gives_zero_output_and_minus_inf_lse():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.tensor([[True, False, True, False], [False] * 4])
    out, lse = attention_with_lse(q, k, v, key_mask=mask)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    assert excess(out[:1], reference_attention(q[:1], k[:1], v[:1], None, mask[:1])) <= 0
    out.sum().backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))
    assert torch.all(q.grad[1] == 0)


def test_merge_of_two_empty_sides_stays_empty():
    out, lse = torch.zeros(1, 3, 2, 4), torch.full((1, 2, 3), float("-inf"))
    merged, merged_lse = merge_attention(out, lse, out.clone(), lse.clone())
    assert torch.all(merged == 0) and torch.all(merged_lse == float("-inf"))
    block = torch.randn(1, 3, 2, 4)
    block_lse = torch.randn(1, 2, 3)
    merged, merged_lse = merge_attention(out, lse, block, block_lse)  # empty, then real keys
    assert torch.equal(merged, block) and torch.equal(merged_lse, block_lse)


def test_block_keep_relative_positions_and_fast_path():
    mask = torch.tensor([[True, False, True, True, False], [True] * 5])
    block = block_keep(keep_lists(mask), 1, 4, torch.device("cpu"))  # positions 1, 2, 3
    assert [b.tolist() for b in block] == [[1, 2], [0, 1, 2]]
    assert block_keep(keep_lists(torch.ones(2, 5, dtype=torch.bool)), 0, 5, torch.device("cpu")) is None
    assert block_keep(None, 0, 5, torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("mask", "joint", "message"),
    [
        (torch.ones(2, 5), None, "bool"),
        (torch.ones(2, 4, dtype=torch.bool), None, "shape"),
        (torch.ones(1, 5, dtype=torch.bool), None, "shape"),
    ],
)
def test_bad_key_masks(mask, joint, message):
    with pytest.raises(ValueError, match=message):
        check_masks(mask, None, joint, 2, 5, "test")
    q = torch.randn(2, 3, 1, 8)
    with pytest.raises(ValueError, match=message):
        attention_with_lse(q, torch.randn(2, 5, 1, 8), torch.randn(2, 5, 1, 8), key_mask=mask)


def test_joint_key_mask_needs_joint_tokens():
    with pytest.raises(ValueError, match="without joint"):
        check_masks(None, torch.ones(2, 3, dtype=torch.bool), None, 2, 5, "test")
