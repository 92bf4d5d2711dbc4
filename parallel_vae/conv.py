"""A stride-1 convolution of a row-banded feature map, slab by slab, exactly.

``band_conv(x, conv, band, prologue=f, upsample=u)`` computes this rank's rows of
``conv(upsample(f(X)))`` where ``X`` is the whole map: for each slab of the band it takes the slab's
rows plus one row on each side (from the band itself, or from the neighbouring ranks' halo rows at
the band's edges), applies the elementwise prologue ``f`` (GroupNorm + activation), optionally
upsamples ×2 (nearest), convolves with zero padding, and keeps the slab's own output rows. Zero
padding is thus only ever *used* at the image's true edges; elsewhere the padded rows' outputs are
dropped. ``f`` runs on halo rows too, with the whole map's statistics, so they match what the
neighbour would compute. Peak temporaries scale with the slab, not the band.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from parallel_vae.bands import ROWS, Band, row_slab, slab_ranges
from parallel_vae.halo import exchange_halos

Tensor = torch.Tensor
Halos = tuple[Tensor | None, Tensor | None]


def conv_problems(path: str, conv: nn.Module, *, kernel: int | None = None) -> list[str]:
    """Why ``conv`` (at ``path``) is not a convolution ``band_conv`` computes: empty if it is.
    ``kernel``: the one kernel size allowed here (default: 1×1 or 3×3)."""
    if type(conv) is not nn.Conv2d:
        return [f"{path}: {type(conv).__name__} (need a plain nn.Conv2d)"]
    k = conv.kernel_size
    if conv.stride != (1, 1) or conv.dilation != (1, 1) or conv.padding_mode != "zeros":
        return [f"{path}: Conv2d with stride {conv.stride}, dilation {conv.dilation}, padding {conv.padding_mode!r}"]
    allowed = ((1, 1), (3, 3)) if kernel is None else ((kernel, kernel),)
    if k not in allowed or conv.padding != (k[0] // 2, k[1] // 2):
        need = " or ".join(f"{a}×{b} with padding {a // 2}" for a, b in allowed)
        return [f"{path}: Conv2d with kernel {k} and padding {conv.padding} (need {need})"]
    return []


def _slab_input(x: Tensor, start: int, stop: int, halos: Halos) -> tuple[Tensor, bool, bool]:
    """Rows ``[start - 1, stop + 1)`` of the map around a slab, as far as they exist; whether the
    row above / below is present (a halo row) or the image ends there."""
    rows = x.shape[ROWS]
    above, below = halos
    lo, hi = max(start - 1, 0), min(stop + 1, rows)
    parts = [row_slab(x, lo, hi)]
    if start == 0 and above is not None:
        parts.insert(0, above)
    if stop == rows and below is not None:
        parts.append(below)
    has_above = start > 0 or above is not None
    has_below = stop < rows or below is not None
    return (torch.cat(parts, ROWS) if len(parts) > 1 else parts[0]), has_above, has_below


def _conv(conv: nn.Conv2d, x: Tensor) -> Tensor:
    return F.conv2d(x, conv.weight, conv.bias, padding=conv.padding, groups=conv.groups)


def _trim(x: Tensor, above: int, below: int) -> Tensor:
    return x.narrow(ROWS, above, x.shape[ROWS] - above - below)


def band_conv(
    x: Tensor,
    conv: nn.Conv2d,
    band: Band,
    *,
    prologue: Callable[[Tensor], Tensor] | None = None,
    upsample: bool = False,
    halos: Halos | None = None,
) -> Tensor:
    """This rank's band of ``conv(upsample(prologue(X)))``; ``x`` ``[B, C, rows, W]`` is its band of ``X``.

    ``halos``: the rows above and below the band (``None`` entries at the image's edges); exchanged
    with the neighbours when not given. Output ``[B, C_out, rows·s, W·s]`` with ``s = 2`` when
    ``upsample``. ``band.tile_rows`` caps the output rows computed at once.
    """
    scale = 2 if upsample else 1
    tile = None if band.tile_rows is None else max(band.tile_rows // scale, 1)
    slabs = slab_ranges(x.shape[ROWS], tile)
    three = conv.kernel_size == (3, 3)
    if three and halos is None:
        halos = exchange_halos(x, band)
    out = None
    for start, stop in slabs:
        if three:
            rows, above, below = _slab_input(x, start, stop, halos)  # type: ignore[arg-type]
        else:
            rows, above, below = row_slab(x, start, stop), False, False
        if prologue is not None:
            rows = prologue(rows)
        if upsample:
            rows = _trim(F.interpolate(rows, scale_factor=2.0, mode="nearest"), int(above), int(below))
        y = _trim(_conv(conv, rows), int(above), int(below))
        if len(slabs) == 1:
            return y
        if out is None:
            out = y.new_empty((*y.shape[:2], x.shape[ROWS] * scale, y.shape[-1]))
        row_slab(out, start * scale, stop * scale).copy_(y)
    assert out is not None
    return out


def add_band_conv_(out: Tensor, x: Tensor, conv: nn.Conv2d | None, band: Band) -> Tensor:
    """``out += conv(x)`` (a 1×1 ``conv``, or ``x`` itself when ``None``) slab by slab, in place."""
    if conv is None:
        return out.add_(x)
    for start, stop in slab_ranges(x.shape[ROWS], band.tile_rows):
        row_slab(out, start, stop).add_(_conv(conv, row_slab(x, start, stop)))
    return out
