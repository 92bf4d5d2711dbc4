"""The all-to-all's block layout, shared by its NCCL path (``collectives``) and its peer path
(``peer``), and copies that move wide words.

Rank ``p``'s block for rank ``r`` is ``[rows, T, rest...]``: ``p``'s entries of the gather dim
first, the ``T`` tensors travelling together next, then the other dims, the scatter dim holding
``r``'s share. The received blocks, concatenated along their first dim, are the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_WORDS = ((8, torch.int64), (4, torch.int32))


def _word_ok(t: torch.Tensor, nbytes: int) -> bool:
    es = t.element_size()
    if es >= nbytes or t.dim() == 0:
        return False
    stride, per_word = t.stride(), nbytes // es
    return (
        stride[-1] == 1
        and t.shape[-1] % per_word == 0
        and all(s % per_word == 0 for s in stride[:-1])
        and t.data_ptr() % nbytes == 0
    )


def as_words(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The tensors with their last dim viewed as 8-byte (else 4-byte) words, if every one allows it.

    A copy between such views moves the same bytes in a quarter (bf16) of the elements: PyTorch's
    kernel for strided copies handles one element per thread step, so wide words make it several
    times faster. Tensors that do not allow it (last dim not contiguous, odd sizes, misaligned) are
    returned as they are.
    """
    for nbytes, dtype in _WORDS:
        if all(_word_ok(t, nbytes) for t in tensors):
            return tuple(t.view(dtype) for t in tensors)
    return tensors


def copy_words(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``dst.copy_(src)`` (same dtype and shape), moving wide words where the layouts allow."""
    d, s = as_words(dst, src)
    d.copy_(s)
    return dst


def block_shape(
    shape: Sequence[int], count: int, scatter_dim: int, gather_dim: int, rows: int, scatter: int
) -> list[int]:
    """``[rows, count, rest...]``: ``rest`` the dims of ``shape`` but ``gather_dim``, with ``scatter``
    entries of ``scatter_dim``."""
    rest = [n for i, n in enumerate(shape) if i != gather_dim]
    rest[scatter_dim if scatter_dim < gather_dim else scatter_dim - 1] = scatter
    return [rows, count, *rest]


def block_words(tensors: Sequence[torch.Tensor], scatter_dim: int, gather_dim: int) -> tuple[torch.Tensor, ...]:
    """The tensors as wide words for packing blocks (decided once per call), unless the last dim is
    the one cut or moved. Blocks start at multiples of the last dim, so they are as aligned as
    their buffer."""
    last = tensors[0].dim() - 1
    return as_words(*tensors) if last not in (scatter_dim, gather_dim) else tuple(tensors)


def pack_block(
    words: Sequence[torch.Tensor], scatter_dim: int, gather_dim: int, start: int, size: int, out: torch.Tensor
) -> None:
    """Entries ``start : start + size`` of every tensor's scatter dim into ``out`` (a block of
    :func:`block_shape` in the tensors' dtype): one copy kernel per tensor."""
    torch.stack([x.narrow(scatter_dim, start, size).movedim(gather_dim, 0) for x in words], 1, out=out)
