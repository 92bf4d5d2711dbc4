"""Compute on one rank, share the result or the failure: text encoders, latents drawn from a generator.

Some work runs once per job rather than on every rank (a 9 GiB T5 on rank 0 only; latents drawn
from rank 0's generator). :func:`compute_on_rank` runs it on the source rank and hands every rank of
the group the same named tensors. If it fails there, the source tells the others before anything
else travels, so every rank raises instead of some waiting for tensors that never come.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist

Tensor = torch.Tensor


def compute_on_rank(
    fn: Callable[[], Mapping[str, Tensor | None]],
    group: dist.ProcessGroup,
    *,
    src: int,
    device: torch.device | str,
    what: str,
) -> dict[str, Tensor | None]:
    """``fn()`` on group rank ``src`` only; every rank of ``group`` returns its named tensors on ``device``.

    ``fn`` returns a record ``{name: tensor or None}`` (``None``: absent, e.g. no negative prompt);
    only ``src`` calls it. One object broadcast carries the names, shapes and dtypes (or the
    failure), then one broadcast per tensor. If ``fn`` raises on ``src``, ``src`` re-raises its
    error and every other rank raises ``ValueError`` (``RuntimeError`` if ``src``'s error was not a
    ``ValueError``): "``what`` failed on group rank ``src``: the error". Every rank calls with the
    same ``group`` and ``src``.
    """
    size = group.size()
    if isinstance(src, bool) or not isinstance(src, int) or not 0 <= src < size:
        raise ValueError(f"{what}: src={src!r} must be a group rank in [0, {size})")
    device = torch.device(device)
    record: Mapping[str, Tensor | None] = {}
    error: Exception | None = None
    header: list[Any] = [None]  # ("ok", [(name, shape, dtype) or (name, None, None)]) or ("failed", ...)
    if group.rank() == src:
        try:
            record = fn()
            header = [("ok", [_meta(name, t, what) for name, t in record.items()])]
        except Exception as e:  # reported to every rank below, then re-raised here
            error = e
            header = [("failed", isinstance(e, ValueError), f"{type(e).__name__}: {e}")]
    dist.broadcast_object_list(header, group=group, group_src=src, device=device)
    if header[0][0] == "failed":
        if error is not None:
            raise error
        _, is_value_error, message = header[0]
        raise (ValueError if is_value_error else RuntimeError)(f"{what} failed on group rank {src}: {message}")
    out: dict[str, Tensor | None] = {}
    for name, shape, dtype in header[0][1]:
        if shape is None:
            out[name] = None
            continue
        if group.rank() == src:
            t = record[name].to(device).contiguous()
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
        if size > 1:
            dist.broadcast(t, group=group, group_src=src)
        out[name] = t
    return out


def _meta(name: str, t: Tensor | None, what: str) -> tuple[str, tuple[int, ...] | None, torch.dtype | None]:
    if t is None:
        return name, None, None
    if not isinstance(t, Tensor):
        raise ValueError(f"{what}: the record's {name!r} must be a tensor or None, got {type(t).__name__}")
    return name, tuple(t.shape), t.dtype
