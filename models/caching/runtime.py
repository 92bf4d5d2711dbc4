"""The step cache at run time: per-branch state, one reduced decision per branch, and the block hooks.

Hooks (``xdit_core.hooks``): ``"xdit.cache"`` on the transformer's ``forward`` (one denoising call:
which branches it holds, where a run starts), ``"xdit.cache.block"`` on the blocks that bound the
reused range, and ``"xdit.cache.context"`` on ``cache_context`` where the model has one (diffusers'
pipelines name their cond and uncond calls with it). Per call:

1. The front blocks (``Fn`` units) run. Their image-stream residual ``r = h_after_front − h_in`` is
   compared with the one of the branch's last computed step: every rank sums ``|r − r_ref|`` and
   ``|r_ref|`` (float64) over its rows of each branch, and one all-reduce over the mesh's ranks gives
   the sums a single process would compute. Every rank therefore takes the same decision per branch.
2. If every branch this rank holds is reused, the middle blocks return their input and the last one
   adds the cached residual (TaylorSeer: its extrapolation); otherwise they run, and reused rows get
   the cached residual in place of their computed one (exact per sample: the blocks never mix samples).
3. The back blocks (``Bn`` units) always run.

Branches: a paired true-CFG call (``models.flux.adapter.cfg_branches``) holds "cond" then "uncond";
otherwise the call is one branch, named by the model's ``cache_context`` if one is active, else
"default". A branch's run starts again when its timestep does not decrease (a new pipeline call) or
the call's global shape changes; a new run never reuses another run's residuals.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from models.caching.config import DBCacheConfig
from models.caching.kinds import Kind, Parallel
from xdit_core.context import CallContext
from xdit_core.hooks import Hook

Tensor = torch.Tensor


@dataclass
class StepRecord:
    run: int
    step: int
    computed: bool
    reason: str
    diff: float | None = None  # the reduced relative L1 change (None: decided without it)
    local_diff: float | None = None  # this rank's own, un-reduced value (None: no rows of the branch here)


@dataclass
class Branch:
    name: str
    run: int = -1
    step: int = 0
    cached: int = 0
    continuous: int = 0
    computed_once: bool = False  # this run computed a step (its residuals are on the ranks holding its rows)
    last_timestep: float | None = None
    key: tuple | None = None
    reference: Tensor | None = None  # this rank's rows of the front residual of the last computed step
    ladder: list[list[Tensor]] = field(default_factory=list)  # per stream: residual and its divided differences
    ladder_step: int = 0
    records: list[StepRecord] = field(default_factory=list)

    def new_run(self, timestep: float, key: tuple | None) -> None:
        self.run += 1
        self.step = self.cached = self.continuous = 0
        self.computed_once = False
        self.reference, self.ladder, self.key = None, [], key
        self.last_timestep = timestep


@dataclass
class Call:
    """One forward call: its timestep and branch names; its rows and decisions, once the first block knows them."""

    timestep: float
    names: tuple[str, ...]
    rows: list[tuple[Branch, int, int]] | None = None  # (branch, first local row, local rows)
    parallel: Parallel | None = None
    reuse: dict[str, bool] = field(default_factory=dict)
    h_in: Tensor | None = None
    m_in: tuple[Tensor, ...] | None = None


class StepCache:
    """The cache of one model instance (what ``enable_cache`` installs)."""

    def __init__(self, model: nn.Module, kind: Kind, config: DBCacheConfig) -> None:
        self.model, self.kind, self.config = model, kind, config
        self.branches: dict[str, Branch] = {}
        self.call = CallContext("step cache", Call)
        self.context_name: str | None = None  # the model's cache_context in effect
        units, fn, bn = kind.units, config.Fn_compute_blocks, config.Bn_compute_blocks
        self.front_end = fn * kind.unit - 1  # index of the last front block (-1: none)
        self.middle = (fn * kind.unit, (units - bn) * kind.unit - 1)  # first and last middle block

    # -------------------------------------------------------------------------------- a call
    def begin(self, timestep: float) -> Call:
        names = self.kind.branches(self.model) or (self.context_name or "default",)
        for name in names:
            branch = self.branches.setdefault(name, Branch(name))
            if branch.last_timestep is None or timestep >= branch.last_timestep:
                branch.new_run(timestep, None)
            branch.last_timestep = timestep
        return Call(timestep, names)

    def end(self, call: Call) -> None:
        for branch, _, _ in call.rows or ():
            branch.step += 1

    def place(self, call: Call, streams: tuple[Tensor, ...]) -> None:
        """Find this rank's rows of each branch (first block of the call)."""
        local = streams[0].shape[0]
        parallel = call.parallel = self.kind.parallel(self.model, local)
        share, extra = divmod(parallel.total, len(call.names))
        if extra:
            raise ValueError(f"step cache: a paired call of {parallel.total} samples does not split into branches")
        # the call's global shape: the parallel layout (the same on every rank) and the streams' shapes
        # (which, given the layout, change on every rank or on none)
        key = (parallel.total, parallel.layout, *(tuple(s.shape) for s in streams))
        call.rows = []
        for i, name in enumerate(call.names):
            branch = self.branches[name]
            if branch.key is None:
                branch.key = key
            elif branch.key != key:  # the shape changed within a run: start afresh
                branch.new_run(call.timestep, key)
            lo = max(i * share, parallel.start) - parallel.start
            hi = min((i + 1) * share, parallel.start + local) - parallel.start
            call.rows.append((branch, lo, max(hi - lo, 0)))

    # ------------------------------------------------------------------------------ decisions
    def gate(self, branch: Branch) -> tuple[bool | None, str]:
        """(reuse, reason) from the counters alone, the same on every rank; ``None``: measure the change."""
        c, step = self.config, branch.step
        if step < c.max_warmup_steps:
            return False, "warmup"
        mask = c.steps_computation_mask
        if mask is not None and (step >= len(mask) or mask[step] == 1):
            return False, "mask"
        if not branch.computed_once:
            return False, "nothing cached yet"
        if 0 <= c.max_cached_steps <= branch.cached:
            return False, "max_cached_steps"
        if 0 <= c.max_continuous_cached_steps <= branch.continuous:
            return False, "max_continuous_cached_steps"
        if c.static:
            return True, "static mask"
        if c.residual_diff_threshold <= 0:
            return False, "threshold 0"
        return None, "threshold"

    def decide(self, call: Call, residual: Tensor | None) -> None:
        parallel = call.parallel
        gates = {branch.name: self.gate(branch) for branch, _, _ in call.rows}
        measure = [b for b, _, _ in call.rows if gates[b.name][0] is None]
        sums = torch.zeros(len(call.rows), 2, dtype=torch.float64)
        if measure:
            for i, (branch, lo, n) in enumerate(call.rows):
                if gates[branch.name][0] is None and n:
                    r, ref = residual[lo : lo + n].double(), branch.reference.double()
                    sums[i] = torch.stack(((r - ref).abs().sum(), ref.abs().sum())).cpu()
            local = sums.clone()
            if parallel.mesh is not None and parallel.mesh.world_size > 1:
                group = parallel.mesh.world_group
                device = "cpu" if dist.get_backend(group) == "gloo" else residual.device
                reduced = sums.to(device)
                dist.all_reduce(reduced, group=group)
                sums = reduced.cpu()
        for i, (branch, lo, n) in enumerate(call.rows):
            reuse, reason = gates[branch.name]
            diff = local_diff = None
            if reuse is None:
                diff = _ratio(sums[i])
                local_diff = _ratio(local[i]) if n else None
                reuse = diff < self.config.residual_diff_threshold
            call.reuse[branch.name] = reuse
            if reuse:
                branch.cached += 1
                branch.continuous += 1
            else:
                branch.continuous = 0
                branch.computed_once = True  # decided on every rank alike, rows here or not
                if residual is not None:
                    branch.reference = residual[lo : lo + n].detach().clone()
            branch.records.append(StepRecord(branch.run, branch.step, not reuse, reason, diff, local_diff))

    # ------------------------------------------------------------------------------- residuals
    def estimate(self, branch: Branch) -> list[Tensor]:
        """The middle blocks' residual of each stream at this step: cached, or TaylorSeer's extrapolation."""
        out = []
        for ladder in branch.ladder:
            dt = branch.step - branch.ladder_step
            value = ladder[0].clone()
            for k in range(1, len(ladder)):
                value = value + ladder[k] * (dt**k / math.factorial(k))
            out.append(value)
        return out

    def remember(self, branch: Branch, residuals: list[Tensor]) -> None:
        order = self.config.taylorseer_order if self.config.enable_taylorseer else 0
        dt = branch.step - branch.ladder_step
        ladders = []
        for s, r in enumerate(residuals):
            new = [r.float() if order else r]
            old = branch.ladder[s] if branch.ladder else []
            for k in range(min(order, len(old))):
                new.append((new[k] - old[k]) / dt)
            ladders.append(new)
        branch.ladder, branch.ladder_step = ladders, branch.step


def _ratio(sums: Tensor) -> float:
    num, den = sums.tolist()
    return math.inf if den == 0 else num / den


# ------------------------------------------------------------------------------------ hooks
class StepHook(Hook):
    """On the transformer's ``forward``: one call of the cache."""

    def __init__(self, cache: StepCache) -> None:
        self.cache = cache
        self.signature = inspect.signature(cache.model.forward)

    def call(self, module: nn.Module, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                "step cache: a CUDA graph is capturing this model's forward, but the cache decides per step "
                "which blocks run; remove_cuda_graph(model) (or cuda_graph=False) to cache steps"
            )
        bound = self.signature.bind(*args, **kwargs).arguments
        for name in self.cache.kind.refused:
            if bound.get(name) is not None:
                raise ValueError(f"step cache: {name} is not supported (its residuals are added between blocks)")
        timestep = bound.get("timestep")
        if not isinstance(timestep, Tensor) or timestep.numel() == 0:
            raise ValueError(
                "step cache: the call needs a timestep tensor (a new run starts when it does not decrease)"
            )
        call = self.cache.begin(float(timestep.reshape(-1)[0]))
        with self.cache.call.entered(call):
            out = inner(*args, **kwargs)
        self.cache.end(call)
        return out


class ContextHook(Hook):
    """On ``cache_context``: remember the call's name (diffusers' pipelines say "cond" or "uncond")."""

    def __init__(self, cache: StepCache) -> None:
        self.cache = cache

    def call(self, module: nn.Module, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        name = args[0] if args else kwargs.get("name")
        return self._named(inner(*args, **kwargs), str(name))

    @contextmanager
    def _named(self, context: Any, name: str) -> Iterator[None]:
        with context:
            previous, self.cache.context_name = self.cache.context_name, name
            try:
                yield
            finally:
                self.cache.context_name = previous


class BlockHook(Hook):
    """On block ``index`` (in the model's block order): the first block, the last front block and every
    middle block."""

    def __init__(self, cache: StepCache, index: int) -> None:
        self.cache, self.index = cache, index

    def call(self, module: nn.Module, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        cache, kind, index = self.cache, self.cache.kind, self.index
        call = cache.call.layout
        streams = kind.streams(args, kwargs)
        if index == 0:
            cache.place(call, streams)
            call.h_in = streams[0]
        first, last = cache.middle
        if index == first:
            if cache.front_end < 0:  # no front blocks: decide from the counters alone
                cache.decide(call, None)
            call.m_in = streams
        if first <= index <= last and self._skips(call):  # the middle blocks pass their input on ...
            return self._reused(call) if index == last else kind.pack(streams)  # ... the last adds the cache
        out = inner(*args, **kwargs)
        if index == cache.front_end:
            residual = kind.unpack(out)[0] - call.h_in
            cache.decide(call, residual)
        if index == last:
            return self._finish(call, out)
        return out

    def _skips(self, call: Call) -> bool:
        """Every branch this rank holds is reused: the middle blocks need not run here."""
        return all(call.reuse[b.name] for b, _, n in call.rows if n)

    def _reused(self, call: Call) -> Any:
        out = [s.clone() for s in call.m_in]
        for branch, lo, n in call.rows:
            if n:
                for s, r in zip(out, self.cache.estimate(branch), strict=True):
                    s[lo : lo + n] += r.to(s.dtype)
        return self.cache.kind.pack(tuple(out))

    def _finish(self, call: Call, out: Any) -> Any:
        cache = self.cache
        streams = list(cache.kind.unpack(out))
        for branch, lo, n in call.rows:
            if not call.reuse[branch.name]:
                rows = slice(lo, lo + n)
                cache.remember(branch, [s[rows] - m[rows] for s, m in zip(streams, call.m_in, strict=True)])
        if any(call.reuse[b.name] and n for b, _, n in call.rows):
            streams = [s.clone() for s in streams]
            for branch, lo, n in call.rows:
                if n and call.reuse[branch.name]:
                    for s, m, r in zip(streams, call.m_in, cache.estimate(branch), strict=True):
                        s[lo : lo + n] = m[lo : lo + n] + r.to(s.dtype)
        return cache.kind.pack(tuple(streams))
