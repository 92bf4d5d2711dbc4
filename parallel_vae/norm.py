"""GroupNorm over a whole feature map whose row bands live on different ranks, exactly.

Two passes, each reduced across the ranks: pass 1 sums every group's values (→ the global mean),
pass 2 sums the squared deviations from that *global* mean (→ the biased variance GroupNorm uses).
Per-rank sums are float32 reductions of this rank's slabs, accumulated and all-reduced in float64.
Summing per-band variances instead (one peer's shortcut) is wrong as soon as bands differ in mean.

Normalising is then a per ``(sample, channel)`` affine map, applied slab by slab in one fused kernel
(``batch_norm`` in inference form, float32 inside, one rounding to the input dtype).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from parallel_vae.bands import ROWS, Band, row_slab

Tensor = torch.Tensor


@dataclass(frozen=True)
class GroupStats:
    """Mean and biased variance ``[B, G]`` (float32) of each sample's channel groups, whole map."""

    mean: Tensor
    var: Tensor


def _group_sums(x: Tensor, groups: int, center: Tensor | None) -> Tensor:
    """Per ``(sample, group)`` sum of ``x`` (or of ``(x - center)²``), float32 reduction, ``[B, G]``."""
    xg = x.unflatten(1, (groups, -1))
    dims = tuple(range(2, xg.dim()))
    if center is None:
        return xg.sum(dims, dtype=torch.float32)
    dev = xg.float() - center.view(*center.shape, *([1] * len(dims)))
    return dev.square_().sum(dims)


def group_stats(x: Tensor, groups: int, band: Band) -> GroupStats:
    """Statistics of GroupNorm(``groups``) over the whole map of which ``x`` ``[B, C, (T,) rows, W]``
    is this rank's band (two passes; collective over ``band.group``)."""
    b, c = x.shape[:2]
    if c % groups:
        raise ValueError(f"GroupNorm: {c} channels do not split into {groups} groups")
    count = (c // groups) * (x[0, 0].numel() // max(x.shape[ROWS], 1)) * band.height

    def reduced(center: Tensor | None) -> Tensor:
        total = torch.zeros(b, groups, dtype=torch.float64, device=x.device)
        for start, stop in band.slabs():
            total += _group_sums(row_slab(x, start, stop), groups, center)
        if band.group.size() > 1:
            dist.all_reduce(total, group=band.group)
        return total / count

    mean = reduced(None).float()
    var = reduced(mean).float()
    return GroupStats(mean, var)


def norm_prologue(
    norm: nn.GroupNorm, x: Tensor, band: Band, act: nn.Module | None = None
) -> Callable[[Tensor], Tensor]:
    """The prologue ``act(norm(rows))`` for any rows of the map of which ``x`` is this rank's band:
    the whole map's statistics (collective over ``band.group``), turned once into the per
    ``(sample, channel)`` affine map that every slab then applies."""
    stats = group_stats(x, norm.num_groups, band)
    b, c = x.shape[:2]
    per_group = c // norm.num_groups
    mean = stats.mean.repeat_interleave(per_group, dim=1).flatten()
    var = stats.var.repeat_interleave(per_group, dim=1).flatten()
    weight = None if norm.weight is None else norm.weight.float().repeat(b)
    bias = None if norm.bias is None else norm.bias.float().repeat(b)

    def prologue(rows: Tensor) -> Tensor:
        flat = rows.reshape(1, b * c, *rows.shape[2:])  # channels of all samples as one batch-norm batch
        y = F.batch_norm(flat, mean, var, weight, bias, training=False, momentum=0.0, eps=norm.eps).view(rows.shape)
        if isinstance(act, nn.SiLU):
            return F.silu(y, inplace=True)  # y is a fresh tensor: spare a slab-sized allocation
        return y if act is None else act(y)

    return prologue


def distributed_group_norm(x: Tensor, norm: nn.GroupNorm, group: dist.ProcessGroup, *, height: int) -> Tensor:
    """``norm`` (a ``GroupNorm``) applied to the whole map, of which ``x`` ``[B, C, (T,) rows, W]`` is
    this rank's row band (``Band.split(height, group)`` layout); returns this rank's band of the result."""
    band = Band.split(height, group)
    if x.shape[ROWS] != band.rows:
        raise ValueError(
            f"distributed_group_norm: this rank's band should have {band.rows} of the {height} rows "
            f"(bands {list(band.sizes)}), got {x.shape[ROWS]}"
        )
    return norm_prologue(norm, x, band)(x)
