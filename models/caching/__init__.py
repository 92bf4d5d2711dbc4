"""Step caching for FLUX and STDiT3 that gives the same result on any mesh as on one process.

``enable_cache(pipe_or_transformer, DBCacheConfig(...))`` installs the cache as hooks on the model
(``"xdit.cache"`` on ``forward``, ``"xdit.cache.block"`` on the blocks at the edges of the reused range
and inside it, ``"xdit.cache.context"`` on ``cache_context``); ``disable_cache`` removes them and the
model computes as before, bit for bit. ``cache_summary`` says, per branch and step, whether the
middle blocks were computed or reused and why. See ``docs/caching.md``.
"""

from __future__ import annotations

from typing import Any

from models.caching.config import (
    NAMED_MASKS,
    DBCacheConfig,
    first_block_cache,
    static_step_mask,
    steps_mask,
)
from models.caching.kinds import kind_of, transformer_of
from models.caching.runtime import BlockHook, ContextHook, StepCache, StepHook
from xdit_core.hooks import get_hook, install_hook, remove_hook

STEP_HOOK, BLOCK_HOOK, CONTEXT_HOOK = "xdit.cache", "xdit.cache.block", "xdit.cache.context"

__all__ = [
    "NAMED_MASKS",
    "DBCacheConfig",
    "cache_summary",
    "disable_cache",
    "enable_cache",
    "first_block_cache",
    "static_step_mask",
    "steps_mask",
]


def enable_cache(target: Any, config: DBCacheConfig) -> Any:
    """Cache the steps of ``target``'s transformer as ``config`` says; returns ``target``.

    ``target``: a diffusers ``FluxTransformer2DModel``, an ``STDiT3``, or a pipeline holding one as
    ``.transformer`` (``FluxPipeline``, ``ParallelFluxPipeline``, ``OpenSoraPipeline``), parallel or
    not, before or after parallelizing. Call it on every rank alike.
    """
    if not isinstance(config, DBCacheConfig):
        raise ValueError(f"enable_cache needs a DBCacheConfig, got {type(config).__name__}")
    model = transformer_of(target, "enable_cache")
    kind = kind_of(model)
    if not getattr(get_hook(model, kind.boundary), "exact", True):
        raise ValueError(
            "enable_cache: the transformer runs the displaced (stale-KV, inexact) mode, and "
            "step caching does not combine with it (unparallelize_flux_displaced it first)"
        )
    config.check_blocks(kind.units, f"this {kind.name} model")
    if get_hook(model, STEP_HOOK) is not None:
        raise ValueError("enable_cache: this model already has a step cache (disable_cache it first)")
    cache = StepCache(model, kind, config)
    first, last = cache.middle
    for index in sorted({0, *([cache.front_end] if cache.front_end >= 0 else []), *range(first, last + 1)}):
        install_hook(kind.blocks[index], BLOCK_HOOK, BlockHook(cache, index))
    if callable(getattr(model, "cache_context", None)):
        install_hook(model, CONTEXT_HOOK, ContextHook(cache), method="cache_context")
    install_hook(model, STEP_HOOK, StepHook(cache))
    return target


def _cache_of(target: Any, what: str) -> StepCache:
    hook = get_hook(transformer_of(target, what), STEP_HOOK)
    if not isinstance(hook, StepHook):
        raise ValueError(f"{what}: this model has no step cache (enable_cache it first)")
    return hook.cache


def disable_cache(target: Any) -> Any:
    """Remove the step cache: the model computes every block again, exactly as before; returns ``target``."""
    cache = _cache_of(target, "disable_cache")
    model = cache.model
    remove_hook(model, STEP_HOOK)
    remove_hook(model, CONTEXT_HOOK, method="cache_context")
    for block in cache.kind.blocks:
        remove_hook(block, BLOCK_HOOK)
    return target


def cache_summary(target: Any) -> dict[str, Any]:
    """What the cache did: per branch (``"default"``, ``"cond"``, ``"uncond"``) a list of steps, each with
    ``run``, ``step``, ``computed``, ``reason``, ``diff`` (the change measured over all ranks),
    ``local_diff`` (this rank's own rows only) and ``blocks`` (the unit ranges computed and reused);
    and the totals ``computed_units`` of ``total_units``."""
    cache = _cache_of(target, "cache_summary")
    units, fn, bn = cache.kind.units, cache.config.Fn_compute_blocks, cache.config.Bn_compute_blocks
    reused = f"{fn}–{units - bn - 1}"
    kept = ", ".join(r for r in (f"0–{fn - 1}" if fn else "", f"{units - bn}–{units - 1}" if bn else "") if r)
    branches, computed_units, total_units = {}, 0, 0
    for name, branch in cache.branches.items():
        steps = []
        for record in branch.records:
            blocks = (
                f"computed 0–{units - 1}"
                if record.computed
                else f"reused {reused}" + (f", computed {kept}" if kept else "")
            )
            computed_units += units if record.computed else fn + bn
            total_units += units
            steps.append({**vars(record), "blocks": blocks})
        branches[name] = steps
    return {
        "config": cache.config.label(),
        "model": cache.kind.name,
        "units": units,
        "branches": branches,
        "computed_units": computed_units,
        "total_units": total_units,
    }
