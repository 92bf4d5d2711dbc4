"""Step-cache settings (cache-dit's field names) and the named step-computation masks.

:class:`DBCacheConfig` describes every policy this package runs:

* **DBCache**: the first ``Fn_compute_blocks`` blocks and the last ``Bn_compute_blocks`` always run;
  the middle ones are reused from the last fully computed step (their residual added to the front
  blocks' output) when the relative L1 change of the front blocks' residual,
  ``Σ|r_t − r_ref| / Σ|r_ref|``, is below ``residual_diff_threshold``.
* **First-block cache**: DBCache with ``Fn=1, Bn=0`` (:func:`first_block_cache`).
* **TaylorSeer** (``enable_taylorseer``): on a reused step the middle blocks' residual is extrapolated
  from the last computed steps by an order-``taylorseer_order`` Taylor series of divided differences.
* **Step mask** (``steps_computation_mask``): 1 = compute this step, 0 = may reuse; with
  ``steps_computation_policy="static"`` every 0-step reuses without looking at the residual (then
  ``Fn=0`` is allowed: the whole block stack is skipped), with ``"dynamic"`` it still has to pass the
  threshold. :func:`steps_mask` builds cache-dit's named masks.

Blocks are counted in the model's units: FLUX's 19 dual-stream + 38 single-stream blocks are 57
units; STDiT3's 28 (spatial, temporal) pairs are 28 units.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

POLICIES = ("dynamic", "static")
# cache-dit's predefined masks for 28 steps: alternating runs of computed and cached steps
NAMED_MASKS = {
    "slow": ((8, 3, 3, 2, 1, 1), (1, 2, 2, 2, 3)),
    "medium": ((6, 2, 2, 2, 2, 1), (1, 3, 3, 3, 3)),
    "fast": ((6, 1, 1, 1, 1, 1), (1, 3, 4, 5, 4)),
    "ultra": ((4, 1, 1, 1, 1), (2, 5, 6, 7)),
}


@dataclass(frozen=True)
class DBCacheConfig:
    """How a transformer's blocks are reused across denoising steps (see the module docstring).

    ``max_warmup_steps``: the first steps of a run always compute. ``max_cached_steps`` /
    ``max_continuous_cached_steps``: caps on reused steps in a run, in total and in a row (-1: none).
    """

    Fn_compute_blocks: int = 8  # cache-dit's field names
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    enable_taylorseer: bool = False
    taylorseer_order: int = 1
    steps_computation_mask: tuple[int, ...] | None = None
    steps_computation_policy: str = "dynamic"

    def __post_init__(self) -> None:
        problems = []
        for name in ("Fn_compute_blocks", "Bn_compute_blocks", "max_warmup_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                problems.append(f"{name} must be an int ≥ 0, got {value!r}")
        for name in ("max_cached_steps", "max_continuous_cached_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < -1:
                problems.append(f"{name} must be an int ≥ 0, or -1 for no limit, got {value!r}")
        threshold = self.residual_diff_threshold
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
            problems.append(f"residual_diff_threshold must be a number ≥ 0, got {threshold!r}")
        if not isinstance(self.enable_taylorseer, bool):
            problems.append(f"enable_taylorseer must be a bool, got {self.enable_taylorseer!r}")
        if not _is_int(self.taylorseer_order) or self.taylorseer_order < 1:
            problems.append(f"taylorseer_order must be an int ≥ 1, got {self.taylorseer_order!r}")
        if self.steps_computation_policy not in POLICIES:
            problems.append(
                f"steps_computation_policy must be one of {POLICIES}, got {self.steps_computation_policy!r}"
            )
        mask = self.steps_computation_mask
        if mask is not None:
            if isinstance(mask, (str, bytes)) or not all(m in (0, 1) and not isinstance(m, float) for m in mask):
                problems.append(f"steps_computation_mask must be a sequence of 0 and 1, got {mask!r}")
            else:
                object.__setattr__(self, "steps_computation_mask", tuple(int(m) for m in mask))
        if self.Fn_compute_blocks == 0 and not self.static:
            problems.append(
                "Fn_compute_blocks=0 leaves no front blocks to measure the change with: use Fn ≥ 1, or a static "
                "step mask (steps_computation_mask=..., steps_computation_policy='static')"
            )
        if problems:
            raise ValueError("DBCacheConfig: " + "; ".join(problems))

    @property
    def static(self) -> bool:
        """Whether reuse follows the step mask alone (no residual test)."""
        return self.steps_computation_mask is not None and self.steps_computation_policy == "static"

    def check_blocks(self, units: int, what: str) -> None:
        """Refuse front + back blocks that leave nothing to reuse in a model of ``units`` blocks."""
        if self.Fn_compute_blocks + self.Bn_compute_blocks >= units:
            raise ValueError(
                f"DBCacheConfig: Fn_compute_blocks + Bn_compute_blocks = {self.Fn_compute_blocks} + "
                f"{self.Bn_compute_blocks} must be below the {units} blocks of {what} (nothing would be cached)"
            )

    def label(self) -> str:
        """cache-dit's short name, e.g. ``DBCache_F8B0_W8M-1MC-1_R0.08`` (``_T1`` with TaylorSeer; ``_SCM12of28S``
        with a static mask of 12 computed steps, ``D`` dynamic)."""
        text = (
            f"DBCache_F{self.Fn_compute_blocks}B{self.Bn_compute_blocks}_W{self.max_warmup_steps}"
            f"M{self.max_cached_steps}MC{self.max_continuous_cached_steps}"
        )
        if not self.static:  # a static mask never measures the change
            text += f"_R{self.residual_diff_threshold:g}"
        if self.enable_taylorseer:
            text += f"_T{self.taylorseer_order}"
        if self.steps_computation_mask is not None:
            computed = sum(self.steps_computation_mask)
            text += f"_SCM{computed}of{len(self.steps_computation_mask)}{'S' if self.static else 'D'}"
        return text

    def replace(self, **changes: Any) -> DBCacheConfig:
        return dataclasses.replace(self, **changes)


def first_block_cache(residual_diff_threshold: float = 0.08, **fields: Any) -> DBCacheConfig:
    """The first-block cache (FBCache): DBCache with ``Fn=1, Bn=0``."""
    return DBCacheConfig(
        Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=residual_diff_threshold, **fields
    )


def static_step_mask(mask: str | list[int] | tuple[int, ...], num_inference_steps: int = 28) -> DBCacheConfig:
    """Compute exactly the steps ``mask`` says (a 0/1 list, or a name of :data:`NAMED_MASKS`), skipping the
    whole block stack on the others (``Fn=0, Bn=0``, no warmup, no residual test)."""
    steps = steps_mask(mask, num_inference_steps) if isinstance(mask, str) else list(mask)
    return DBCacheConfig(
        Fn_compute_blocks=0,
        Bn_compute_blocks=0,
        max_warmup_steps=0,
        steps_computation_mask=tuple(steps),
        steps_computation_policy="static",
    )


def steps_mask(policy: str = "medium", num_inference_steps: int = 28) -> list[int]:
    """cache-dit's named mask (``slow``, ``medium``, ``fast``, ``ultra``) for ``num_inference_steps``.

    Built for 28 steps from alternating compute and cache runs; longer runs grow every run by
    ``max(int(run · N/28 · 0.5), 1)`` and are cut to ``N``; shorter runs are the 28-step mask cut to
    ``N``. The last step is always computed."""
    if policy not in NAMED_MASKS:
        raise ValueError(f"steps_mask: policy must be one of {sorted(NAMED_MASKS)}, got {policy!r}")
    if not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise ValueError(f"steps_mask: num_inference_steps must be an int ≥ 1, got {num_inference_steps!r}")
    compute, cache = NAMED_MASKS[policy]
    if num_inference_steps > 28:
        grow = num_inference_steps / 28 * 0.5
        compute = tuple(n + max(int(n * grow), 1) for n in compute)
        cache = tuple(n + max(int(n * grow), 1) for n in cache)
    mask: list[int] = []
    for i, run in enumerate(compute):
        mask += [1] * run
        if i < len(cache):
            mask += [0] * cache[i]
    mask = (mask + [1] * num_inference_steps)[:num_inference_steps]
    mask[-1] = 1
    return mask


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
