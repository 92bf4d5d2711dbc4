"""Boundary plans: what a model's parallel boundary splits and gathers, written as data.

A :class:`Plan` lists, for the named values that cross a model's boundary, where each one goes:

* :class:`Split` — value ``name`` is dealt along tensor dim ``dim`` over mesh axis ``axis`` in
  ``tensor_split`` chunks (any length; the first ``n % P`` chunks one longer, a chunk may be
  empty). ``per_sample``: only when its leading dim is the call's batch (``Plan.batch`` names the
  value that defines it); scalars, shared tensors and ``None`` pass through. ``halo``: each rank
  also takes up to that many neighbouring entries on each side (clipped at the ends), as a
  3×3 convolution over row bands needs.
* :class:`Replicate` — value ``name`` stays whole on every rank of ``axis`` (FLUX's joint text
  tokens); listed so the plan says so, nothing moves.
* :class:`Gather` — output ``name`` is concatenated back along ``dim`` over ``axis``, with the chunk
  sizes of the split of ``like`` (times ``scale``: a decoder's upsampling), to every rank or to
  group rank ``to``.

:func:`split` applies a plan's inputs and records every chunk size it used in a :class:`Placement`;
:func:`gather` applies its outputs with those sizes. Adapters build their per-call layout (the
context their processors read) from the placement, so what the processors assume is what was
split. The plans of FLUX, STDiT3 and the VAE are in their adapters (``FLUX_PLAN`` and friends);
``Plan.table()`` prints one. Splits are differentiable (the gradient of a replicated input is
gathered back, as :func:`~xdit_core.collectives.shard`), gathers too, halo splits and gathers to
one rank are inference only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from xdit_core.collectives import check_dim, gather_to, shard, split_sizes
from xdit_core.collectives import gather as gather_chunks

Tensor = torch.Tensor
Groups = Mapping[str, dist.ProcessGroup]


@dataclass(frozen=True)
class Split:
    """Deal value ``name`` along ``dim`` over mesh axis ``axis`` (see the module docstring)."""

    name: str
    dim: int
    axis: str
    per_sample: bool = False
    halo: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.halo, int) or self.halo < 0:
            raise ValueError(f"Split({self.name!r}): halo must be a non-negative int, got {self.halo!r}")
        if self.halo and self.per_sample:
            raise ValueError(f"Split({self.name!r}): a per-sample split takes no halo")


@dataclass(frozen=True)
class Replicate:
    """Value ``name`` stays whole on every rank of ``axis``."""

    name: str
    axis: str


@dataclass(frozen=True)
class Gather:
    """Concatenate output ``name`` along ``dim`` over ``axis``, in the chunk sizes of ``like``'s split × ``scale``."""

    name: str
    dim: int
    axis: str
    like: str
    scale: int = 1
    to: int | None = None


@dataclass(frozen=True)
class Plan:
    """A model boundary: ``inputs`` applied in order by :func:`split`, ``outputs`` in order by :func:`gather`."""

    what: str
    inputs: tuple[Split | Replicate, ...]
    outputs: tuple[Gather, ...]
    batch: str | None = None  # the value whose leading dim is the batch (per-sample splits)

    def __post_init__(self) -> None:
        splits = {(s.name, s.axis) for s in self.inputs if isinstance(s, Split)}
        for g in self.outputs:
            if (g.like, g.axis) not in splits:
                raise ValueError(f"{self.what} plan: Gather({g.name!r}) follows {g.like!r} on {g.axis!r}, not split")
        if any(s.per_sample for s in self.inputs if isinstance(s, Split)) and self.batch is None:
            raise ValueError(f"{self.what} plan: per-sample splits need Plan.batch (the value that gives the batch)")

    def table(self) -> str:
        """The plan as a text table, one row per entry."""
        rows = [("value", "goes", "dim", "axis", "notes")]
        for s in self.inputs:
            if isinstance(s, Replicate):
                rows.append((s.name, "replicate", "", s.axis, "whole on every rank"))
            else:
                notes = ", ".join([*(["per sample"] if s.per_sample else []), *([f"halo {s.halo}"] if s.halo else [])])
                rows.append((s.name, "split", str(s.dim), s.axis, notes))
        for g in self.outputs:
            to = "to every rank" if g.to is None else f"to rank {g.to}"
            scale = f" × {g.scale}" if g.scale != 1 else ""
            rows.append((g.name, "gather", str(g.dim), g.axis, f"sizes of {g.like}{scale}, {to}"))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


@dataclass
class Placement:
    """What :func:`split` did in one call: every rank's chunk sizes and this rank's halo, per ``(value, axis)``;
    ``whole``: the per-sample splits a value passed through (shared by every sample, so not gathered either)."""

    batch: int | None = None
    sizes: dict[tuple[str, str], tuple[int, ...]] = field(default_factory=dict)
    halos: dict[tuple[str, str], tuple[int, int]] = field(default_factory=dict)
    whole: set[tuple[str, str]] = field(default_factory=set)

    def sizes_of(self, name: str, axis: str) -> tuple[int, ...]:
        """Every rank's chunk of ``name`` on ``axis``, in group-rank order."""
        if (name, axis) not in self.sizes:
            raise KeyError(f"{name!r} was not split over {axis!r} in this call (split: {sorted(self.sizes)})")
        return self.sizes[(name, axis)]

    def own(self, x: Tensor, name: str, axis: str, dim: int) -> Tensor:
        """``x`` (``name``'s chunk with its halo along ``dim``) without the halo: this rank's own entries."""
        before, after = self.halos.get((name, axis), (0, 0))
        return x.narrow(dim, before, x.shape[dim] - before - after)


def split(plan: Plan, groups: Groups, values: Mapping[str, Any], placement: Placement | None = None) -> tuple[
    dict[str, Any], Placement
]:  # fmt: skip
    """This rank's part of ``values`` under ``plan.inputs``, and the :class:`Placement` it used.

    Values the plan does not name pass through; a named value that is ``None`` or absent is skipped
    (optional inputs); a list or tuple is split element by element. ``placement``: add to the one of
    an earlier stage of the same call (e.g. tokens made inside the model after the inputs were split).
    """
    out = dict(values)
    placement = Placement() if placement is None else placement
    if placement.batch is None and plan.batch is not None and isinstance(out.get(plan.batch), Tensor):
        placement.batch = out[plan.batch].shape[0]
    for entry in plan.inputs:
        if isinstance(entry, Replicate) or out.get(entry.name) is None:
            continue
        group = _group(plan, groups, entry.axis)
        value = out[entry.name]
        if isinstance(value, (list, tuple)):
            out[entry.name] = type(value)(_split_one(plan, entry, group, x, placement) for x in value)
        else:
            out[entry.name] = _split_one(plan, entry, group, value, placement)
    return out, placement


def gather(plan: Plan, groups: Groups, values: Mapping[str, Any], placement: Placement) -> dict[str, Any]:
    """``values`` with every output of ``plan.outputs`` concatenated back over its axis.

    A gather to one rank (``to``) leaves the other ranks their own chunk. A gather that follows a
    per-sample split the value passed through (it was shared) leaves the output as it is."""
    out = dict(values)
    for entry in plan.outputs:
        x = out.get(entry.name)
        if x is None or (entry.like, entry.axis) in placement.whole:
            continue
        group = _group(plan, groups, entry.axis)
        if group.size() == 1:
            continue
        d = check_dim(entry.dim, x.dim(), f"{plan.what}: gather {entry.name!r}")
        sizes = [n * entry.scale for n in placement.sizes_of(entry.like, entry.axis)]
        if x.shape[d] != sizes[group.rank()]:
            raise ValueError(
                f"{plan.what}: output {entry.name!r} has {x.shape[d]} entries along dim {entry.dim} on this rank, "
                f"the plan expects {sizes[group.rank()]} ({entry.like!r}'s chunk × {entry.scale})"
            )
        if entry.to is None:
            out[entry.name] = gather_chunks(x, group, dim=d, sizes=sizes)
        else:
            whole = gather_to(x, group, dim=d, sizes=sizes, dst=entry.to, check_ranks=False)
            out[entry.name] = x if whole is None else whole
    return out


def _group(plan: Plan, groups: Groups, axis: str) -> dist.ProcessGroup:
    if axis not in groups:
        raise ValueError(f"{plan.what}: the plan uses axis {axis!r}, the mesh has {sorted(groups)}")
    return groups[axis]


def _split_one(plan: Plan, entry: Split, group: dist.ProcessGroup, x: Any, placement: Placement) -> Any:
    key = (entry.name, entry.axis)
    if not isinstance(x, Tensor):
        if entry.per_sample:
            placement.whole.add(key)
            return x  # a Python scalar or other shared value
        raise ValueError(f"{plan.what}: {entry.name!r} must be a tensor to split, got {type(x).__name__}")
    if entry.per_sample and (x.dim() == 0 or x.shape[0] != placement.batch):
        placement.whole.add(key)
        return x  # shared by every sample (a scalar timestep, one guidance value)
    d = check_dim(entry.dim, x.dim(), f"{plan.what}: split {entry.name!r}")
    n, size, rank = x.shape[d], group.size(), group.rank()
    sizes = tuple(split_sizes(n, size))
    if placement.sizes.setdefault(key, sizes) != sizes:
        raise ValueError(f"{plan.what}: the parts of {entry.name!r} differ in length along dim {entry.dim}")
    if size == 1:
        return x
    if not entry.halo:
        return shard(x, group, dim=d)
    if x.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{plan.what}: halo splits are inference only ({entry.name!r} requires grad)")
    start = sum(sizes[:rank])
    lo, hi = max(start - entry.halo, 0), min(start + sizes[rank] + entry.halo, n)
    placement.halos[key] = (start - lo, hi - start - sizes[rank])
    return x.narrow(d, lo, hi - lo)
