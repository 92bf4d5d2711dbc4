"""Wide-word copies (``xdit_core.peer.as_words`` / ``copy_words``): the same bytes, whatever the layout."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xdit_core.peer import as_words, copy_words

DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.int8, torch.float64]


@st.composite
def strided_pairs(draw):
    """A random tensor (random bits, NaN patterns included) seen through a random permutation and
    slice, and a destination of the same shape with another random layout."""
    dtype = draw(st.sampled_from(DTYPES))
    dims = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(1, 6), min_size=dims, max_size=dims))
    shape[-1] = draw(st.sampled_from([1, 2, 3, 4, 8, 12, 16]))
    raw = torch.randint(-(2**62), 2**62, (int(torch.tensor(shape).prod()) * 8 + 8,), dtype=torch.int64)
    base = raw.view(torch.uint8).view(dtype)
    offset = draw(st.integers(0, 3))
    src = base[offset : offset + int(torch.tensor(shape).prod())].view(shape)
    perm = draw(st.permutations(range(dims)))
    src = src.permute(perm)  # the last dim may or may not stay contiguous
    dst = torch.empty(list(reversed(src.shape)), dtype=dtype).permute(*reversed(range(dims)))
    if draw(st.booleans()):
        dst = torch.empty(src.shape, dtype=dtype)
    return src, dst


@settings(max_examples=150, deadline=None)
@given(strided_pairs())
def test_copy_words_moves_exactly_the_bytes(pair):
    src, dst = pair
    out = copy_words(dst, src)
    assert out is dst

    def as_bytes(t):
        return torch.empty(t.shape, dtype=t.dtype).copy_(t).view(torch.uint8)  # a fresh contiguous copy

    assert torch.equal(as_bytes(dst), as_bytes(src))


@settings(max_examples=150, deadline=None)
@given(strided_pairs())
def test_as_words_widens_only_when_every_tensor_allows_it(pair):
    src, dst = pair
    views = as_words(dst, src)
    if views[0].dtype == dst.dtype:  # unchanged: the originals themselves
        assert views[0] is dst and views[1] is src
        return
    word = views[0].element_size()
    assert word in (4, 8) and word > dst.element_size() and views[1].dtype == views[0].dtype
    for t, v in zip((dst, src), views, strict=True):
        assert v.data_ptr() == t.data_ptr()
        assert v.shape[:-1] == t.shape[:-1] and v.shape[-1] * word == t.shape[-1] * t.element_size()


def test_as_words_examples():
    x = torch.zeros(4, 6, 128, dtype=torch.bfloat16)
    assert as_words(x)[0].dtype == torch.int64  # 128 bf16 = 32 words of 8 bytes
    assert as_words(x[..., 2:10])[0].dtype == torch.int32  # starts 4 bytes past an 8-byte boundary
    assert as_words(x[..., 1:9])[0].dtype == torch.bfloat16  # 2-byte offset: nothing wider fits
    assert as_words(x.transpose(1, 2))[0].dtype == torch.bfloat16  # last dim not contiguous
    assert as_words(x, torch.zeros(3, dtype=torch.float32))[0].dtype == torch.bfloat16  # 12 bytes: no 8-byte words
    assert as_words(torch.zeros(5, 2, dtype=torch.float32))[0].dtype == torch.int64
    assert as_words(torch.zeros(5, 3, dtype=torch.float32))[0].dtype == torch.float32
    assert as_words(torch.zeros(5, 2, dtype=torch.float64))[0].dtype == torch.float64  # already 8-byte words
