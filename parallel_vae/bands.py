"""Row bands: which rows of a feature map each rank holds, and the slabs a band is processed in.

A feature map ``[B, C, (T,) H, W]`` is split along ``H`` (always dim ``-2``) into one contiguous band
per rank of a process group, in group-rank order, with ``torch.tensor_split`` sizes (the first
``H % P`` bands one row longer). Nearest ×2 upsampling doubles every band, so the bands stay
aligned through the decoder and only convolutions (halo rows) and norms (statistics) communicate.
Within a rank a band may be processed in slabs of at most ``tile_rows`` rows to cap temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from xdit_core.collectives import split_sizes

ROWS = -2  # the dim bands split


def check_tile_rows(tile_rows: int | None, what: str) -> None:
    if tile_rows is not None and (not isinstance(tile_rows, int) or isinstance(tile_rows, bool) or tile_rows < 1):
        raise ValueError(f"{what}: tile_rows must be a positive int or None (whole bands), got {tile_rows!r}")


def slab_ranges(rows: int, tile_rows: int | None) -> list[tuple[int, int]]:
    """``[start, stop)`` row ranges covering ``rows`` rows in order, each at most ``tile_rows`` long."""
    step = rows if tile_rows is None else tile_rows
    return [(r, min(r + step, rows)) for r in range(0, rows, max(step, 1))]


@dataclass(frozen=True)
class Band:
    """This rank's rows of a feature map split into row bands over ``group``.

    ``sizes``: every rank's rows at the current resolution, in group-rank order; ``tile_rows``:
    the longest slab a layer processes at once (``None``: the whole band).
    """

    group: dist.ProcessGroup
    sizes: tuple[int, ...]
    rank: int
    tile_rows: int | None = None

    @classmethod
    def split(cls, height: int, group: dist.ProcessGroup, tile_rows: int | None = None) -> Band:
        """Bands of a map ``height`` rows high: ``tensor_split`` sizes, one band per rank of ``group``."""
        check_tile_rows(tile_rows, "Band.split")
        if height < group.size():
            raise ValueError(
                f"a feature map {height} rows high cannot be split into {group.size()} row bands "
                f"(every rank needs at least one row): use at most {height} ranks"
            )
        return cls(group, tuple(split_sizes(height, group.size())), group.rank(), tile_rows)

    @property
    def rows(self) -> int:
        return self.sizes[self.rank]

    @property
    def start(self) -> int:
        """Index of this band's first row in the whole map."""
        return sum(self.sizes[: self.rank])

    @property
    def height(self) -> int:
        return sum(self.sizes)

    @property
    def is_top(self) -> bool:
        return self.rank == 0

    @property
    def is_bottom(self) -> bool:
        return self.rank == len(self.sizes) - 1

    def upsampled(self, factor: int = 2) -> Band:
        """The same bands after nearest upsampling by ``factor``."""
        return replace(self, sizes=tuple(factor * n for n in self.sizes))

    def slabs(self) -> list[tuple[int, int]]:
        return slab_ranges(self.rows, self.tile_rows)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's band of a whole map ``x`` (a view)."""
        return x.narrow(ROWS, self.start, self.rows)


def row_slab(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``[start, stop)`` of ``x`` along the band dim (a view)."""
    return x.narrow(ROWS, start, stop - start)
