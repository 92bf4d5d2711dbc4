"""Helpers for multi-rank tests: run on gloo in spawned processes, compare with one device."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, settings

from xdit_core import spawn

# Tolerances for float32 on CPU (reference/attention.md §4; PyTorch CP uses 2e-6 / 1e-5).
ATOL = 1e-5
RTOL = 1e-5


# Settings for hypothesis inside spawned ranks: every rank must draw the same examples in the same
# order (derandomize, no database) and never diverge (no shrinking: a failure is reported as drawn).
def rank_settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        derandomize=True,
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


def run_ranks(fn: Any, world_size: int, *args: Any, timeout_s: float = 300.0) -> list[Any]:
    """``fn(*args)`` on ``world_size`` gloo ranks; a hang fails after ``timeout_s``."""
    return spawn(fn, world_size, *args, backend="gloo", timeout_s=timeout_s)


def agreed_max(value: float) -> float:
    """The maximum of ``value`` over all ranks, so every rank takes the same branch."""
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def expect_value_errors(cases: dict[str, Any], group: dist.ProcessGroup | None = None) -> list[str]:
    """Call each case; every one must raise ``ValueError`` here. Returns ``"name: message"`` lines.

    A barrier afterwards proves no rank was left inside a collective.
    """
    messages = []
    for name, call in cases.items():
        try:
            call()
        except ValueError as e:
            messages.append(f"{name}: {e}")
        else:
            raise AssertionError(f"{name}: no ValueError on rank {dist.get_rank()}")
    dist.barrier(group)
    return messages


def excess(actual: torch.Tensor, expected: torch.Tensor, atol: float = ATOL, rtol: float = RTOL) -> float:
    """``max(|a - e| - atol - rtol |e|)``: positive iff ``allclose`` fails. NaN counts as failure."""
    if actual.shape != expected.shape:
        return float("inf")
    if actual.numel() == 0:  # a rank that holds no tokens has nothing to be wrong about
        return float("-inf")
    diff = (actual.double() - expected.double()).abs() - atol - rtol * expected.double().abs()
    if torch.isnan(diff).any():
        return float("inf")
    return diff.max().item()


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, key_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` in the ``[B, S, H, D]`` layout; ``key_mask`` ``[B, S_k]`` bool."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale
    )
    return out.transpose(1, 2)


def random_key_mask(batch: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """A random ``[batch, length]`` key mask that keeps at least one key per sample."""
    mask = torch.rand(batch, length, generator=generator) > 0.4
    mask[torch.arange(batch), torch.randint(length, (batch,), generator=generator)] = True
    return mask


def worker_setup() -> None:
    """Per-rank settings: one thread per rank (ranks share the cores)."""
    torch.set_num_threads(1)
