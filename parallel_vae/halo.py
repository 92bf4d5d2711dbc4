"""Halo exchange: the neighbouring ranks' boundary rows a 3×3 convolution of a band needs.

Rank ``r`` sends its first row to ``r - 1`` and its last row to ``r + 1`` and receives theirs, both
directions in one ``all_to_all_single`` whose only non-empty splits go to the two neighbours. The
first rank has no row above and the last none below: there (and only there) the convolution pads
with zeros, as the single-device convolution does at the image's edges.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from parallel_vae.bands import ROWS, Band

Tensor = torch.Tensor


def exchange_halos(x: Tensor, band: Band) -> tuple[Tensor | None, Tensor | None]:
    """``(above, below)``: the row just above this band and the one just below, each ``x``-shaped
    with one row; ``None`` at the image's true top / bottom edge. ``x``: this rank's band
    ``[B, C, (T,) rows, W]``."""
    size, rank = band.group.size(), band.rank
    if size == 1:
        return None, None
    first, last = x.narrow(ROWS, 0, 1), x.narrow(ROWS, x.shape[ROWS] - 1, 1)
    sends = [*([first] if rank > 0 else []), *([last] if rank < size - 1 else [])]  # in destination-rank order
    send = torch.stack(sends).contiguous(memory_format=torch.contiguous_format)
    recv = send.new_empty(send.shape)
    neighbours = (rank - 1, rank + 1)
    splits = [1 if p in neighbours else 0 for p in range(size)]
    dist.all_to_all_single(recv, send, splits, splits, group=band.group)
    above = recv[0] if rank > 0 else None
    below = recv[-1] if rank < size - 1 else None
    return above, below
