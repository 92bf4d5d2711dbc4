"""``xdit_core.blocks`` and ``xdit_core.peer`` on the CPU: wide-word copies (``as_words`` /
``copy_words``) move the same bytes whatever the layout, and ``PeerExchange.exchange`` puts every
block where the all-to-all layout says.

The exchange itself needs CUDA symmetric memory (its GPU tests are in ``test_gpu_parallel.py``);
here P simulated ranks share plain CPU byte buffers as their "peer mappings" and a barrier that
does nothing (the ranks write one after another), which exercises every offset, the word views and
the write order of the real code.
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from xdit_core.blocks import as_words, copy_words
from xdit_core.collectives import split_sizes
from xdit_core.peer import PeerExchange

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


class _NoBarrier:
    def barrier(self, channel: int = 0) -> None:
        pass


def _simulated_ranks(world: int, slot_bytes: int) -> list[PeerExchange]:
    buffers = [torch.zeros(2 * slot_bytes, dtype=torch.uint8) for _ in range(world)]
    ranks = []
    for rank in range(world):
        ex = object.__new__(PeerExchange)  # no CUDA here: set up what __init__ and _reserve would
        ex._size, ex._rank, ex._slot_bytes, ex._turn = world, rank, slot_bytes, 0
        ex._peers, ex._handle, ex._views = buffers, _NoBarrier(), {}
        ranks.append(ex)
    return ranks


@st.composite
def exchanges(draw):
    world = draw(st.integers(2, 4))
    dims = draw(st.integers(2, 4))
    scatter_dim, gather_dim = draw(st.permutations(range(dims)))[:2]
    shape = draw(st.lists(st.integers(1, 4), min_size=dims, max_size=dims))
    shape[-1] = draw(st.sampled_from([1, 3, 4, 8]))
    scatter_total = draw(st.integers(0, 3 * world))
    uneven = draw(st.booleans())
    scatter_sizes = split_sizes(scatter_total, world) if uneven else [scatter_total // world] * world
    shape[scatter_dim] = sum(scatter_sizes)
    gather_sizes = [draw(st.integers(0, 3)) for _ in range(world)]
    dtype = draw(st.sampled_from([torch.bfloat16, torch.float32]))
    count = draw(st.integers(1, 3))
    return world, shape, scatter_dim, gather_dim, scatter_sizes, gather_sizes, dtype, count


@settings(max_examples=120, deadline=None)
@given(exchanges())
def test_exchange_puts_every_block_in_place(case):
    """Transient exchanges (views of the slot; with the no-op barrier a plain exchange would copy its
    slot out before the later simulated ranks have written), a pair of them: both slots."""
    world, shape, sd, gd, scatter_sizes, gather_sizes, dtype, count = case
    inputs = []
    for p in range(world):
        local = list(shape)
        local[gd] = gather_sizes[p]
        inputs.append(tuple(torch.randn(local).to(dtype) for _ in range(count)))
    starts = [sum(scatter_sizes[:r]) for r in range(world)]
    ranks = _simulated_ranks(world, slot_bytes=2**16)
    for i in range(2):
        received = [ex.exchange(inputs[p], sd, gd, scatter_sizes, gather_sizes, True) for p, ex in enumerate(ranks)]
        for r in range(world):  # from every rank p: its scatter block r, gather dim first, the T tensors next
            blocks = [
                torch.stack([x.narrow(sd, starts[r], scatter_sizes[r]).movedim(gd, 0) for x in inputs[p]], 1)
                for p in range(world)
            ]
            assert torch.equal(received[r], torch.cat(blocks)), (r, case)
            if received[r].numel():
                assert received[r].data_ptr() - ranks[r]._peers[r].data_ptr() == i * 2**16, "the pair's slots"
        moved = sum(scatter_sizes) > 0 and sum(gather_sizes) > 0  # else nothing is written: no slot is used
        assert [ex._turn for ex in ranks] == [(i + 1) % 2 if moved else 0] * world
        inputs = [tuple(x.flip(gd) for x in xs) for xs in inputs]  # other data for the second exchange
