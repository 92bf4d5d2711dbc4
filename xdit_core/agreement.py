"""Ranks agree on a call before its first collective: one small collective per new call signature.

A collective whose ranks disagree on sizes reinterprets bytes (float16 read as bfloat16, heads read
as head dims), aborts the process (gloo's ``EnforceNotMet``) or hangs until the process-group
timeout. So every communicating entry point describes its call as a *signature* (shapes, dtypes,
every rank's lengths, masks, sizes: whatever must be equal on all ranks) and calls :func:`agree`
first. The ranks exchange an 8-byte digest of it; when the digests differ they exchange the
signatures themselves and every rank raises the same ``ValueError`` naming what differs and on
which rank. A rank whose own validation refused the call takes part with its refusal, so the
others raise too (naming that rank) instead of waiting in the next collective.

Cost: a signature this rank has already agreed on with its group is found in a small host cache
(one tuple hash); only new signatures communicate (and synchronise the host, once). Nothing runs
inside CUDA-graph replay (no Python runs there); during a capture nothing is exchanged.

Limit (stated in docs/attention.md): the cache is per rank. If every rank has already agreed on
signature A and on signature B, a later call with A on some ranks and B on others is not checked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
CACHE_SIZE = 4096  # signatures remembered per group (all forgotten at once beyond that)

# The signatures each group has agreed on: a memo about a group object, dropped with the group.
_agreed: weakref.WeakKeyDictionary[dist.ProcessGroup, set[tuple[Any, ...]]] = weakref.WeakKeyDictionary()


def tensor_signature(x: torch.Tensor) -> tuple[Any, ...]:
    """``(shape, dtype, device type, requires_grad)``: what another rank's tensor must match."""
    return (tuple(x.shape), x.dtype, x.device.type, x.requires_grad)


def content_digest(x: torch.Tensor) -> str:
    """A short digest of a (small) tensor's values, to compare masks across ranks."""
    host = x.detach().to("cpu").contiguous()
    data = host.view(torch.uint8).numpy().tobytes() if host.numel() else b""
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def agree(
    group: dist.ProcessGroup,
    what: str,
    names: tuple[str, ...],
    values: tuple[Any, ...] | None,
    *,
    refused: ValueError | None = None,
) -> None:
    """Return when every rank of ``group`` called with equal ``values``; else raise the same ``ValueError`` on all.

    ``names[i]`` says what ``values[i]`` is (for the message); values are hashable, with a ``repr``
    that is the same in every process (ints, strings, tuples, ``torch.dtype``). ``refused``: this
    rank's own validation error (``values`` then ``None``); every rank raises (the others naming
    this rank), and this rank raises ``refused`` itself when all ranks refused alike.
    """
    if refused is None and values is None:
        raise ValueError("agree: pass the call's values or this rank's refusal")
    if group.size() == 1:
        if refused is not None:
            raise refused
        return
    key = (what, values)
    known = _agreed.get(group)
    if refused is None and known is not None and key in known:  # the steady state: no communication
        return
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        # A capture replays what was warmed up eagerly (and agreed then); it cannot synchronise the host.
        if refused is not None:
            raise refused
        return
    signature = ("refused", str(refused)) if refused is not None else key
    signatures = _exchange(group, signature)
    if signatures is None:  # every rank passed the same
        if refused is not None:
            raise refused  # every rank refused the same call the same way
        if known is None or len(known) >= CACHE_SIZE:
            known = _agreed[group] = set()
        known.add(key)
        return
    raise ValueError(describe_disagreement(what, [_fields(names, s) for s in signatures]))


@torch.compiler.disable
def _exchange(group: dist.ProcessGroup, signature: tuple[Any, ...]) -> list[tuple[Any, ...]] | None:
    """``None`` when every rank's ``signature`` has the same digest, else every rank's signature."""
    device = _device_of(group)
    digest = int.from_bytes(hashlib.blake2b(repr(signature).encode(), digest_size=8).digest(), "little", signed=True)
    digests = [torch.empty(1, dtype=torch.int64, device=device) for _ in range(group.size())]
    dist.all_gather(digests, torch.tensor([digest], dtype=torch.int64, device=device), group=group)
    if len({int(d.item()) for d in digests}) == 1:
        return None
    signatures: list[Any] = [None] * group.size()
    dist.all_gather_object(signatures, signature, group=group)
    return signatures


def _fields(names: tuple[str, ...], signature: tuple[Any, ...]) -> dict[str, Any]:
    """A rank's signature as ``{name: value}`` (``{"refused": message}`` for a refusal)."""
    if signature[0] == "refused":
        return {"refused": signature[1]}
    what, values = signature
    if len(values) != len(names):  # another kind of call than this rank's
        return {"call": what, "values": values}
    return {"call": what, **dict(zip(names, values, strict=True))}


def describe_disagreement(what: str, signatures: list[dict[str, Any]]) -> str:
    """One message, the same on every rank: each rank's refusal, then each field whose values differ."""
    lines = [f"rank {r} refused the call: {s['refused']}" for r, s in enumerate(signatures) if "refused" in s]
    others = [(r, s) for r, s in enumerate(signatures) if "refused" not in s]
    names = list(dict.fromkeys(name for _, s in others for name in s))
    for name in names:
        by_value: dict[str, list[int]] = {}
        for r, s in others:
            by_value.setdefault(repr(s.get(name, "(absent)")), []).append(r)
        if len(by_value) > 1:
            parts = [f"{_ranks(ranks)} {value}" for value, ranks in by_value.items()]
            lines.append(f"{name}: " + ", ".join(parts))
    return (
        f"{what}: the ranks of the group (size {len(signatures)}) did not make the same call "
        "(every rank must pass the same shapes, dtypes, lengths and options): " + "; ".join(lines)
    )


def _ranks(ranks: list[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))


def _device_of(group: dist.ProcessGroup) -> torch.device:
    """Where the digest travels: the host when the group's backend takes CPU tensors, else this GPU."""
    backend = str(dist.get_backend(group))
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def agreed(
    group: dist.ProcessGroup,
    what: str,
    check_ranks: bool,
    validate: Callable[[], T],
    names: tuple[str, ...],
    values: Callable[[T], tuple[Any, ...]],
) -> T:
    """``validate()`` on this rank, then (``check_ranks``) :func:`agree` on ``values(result)`` or on the refusal.

    The pattern of every communicating entry point: a ``ValueError`` from ``validate`` reaches
    every rank of ``group`` (each naming the refusing rank) instead of only this one.
    """
    try:
        result = validate()
    except ValueError as refusal:
        if check_ranks:
            agree(group, what, names, None, refused=refusal)
        raise
    if check_ranks and group.size() > 1:
        agree(group, what, names, values(result))
    return result


def input_signature(value: Any) -> Any:
    """A hashable description of a call's inputs: tensors by :func:`tensor_signature`, numbers,
    strings, bools and ``None`` by value, containers and dataclasses item by item, other objects by type."""
    if isinstance(value, torch.Tensor):
        return tensor_signature(value)
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if isinstance(value, torch.device):
        return str(value)
    if isinstance(value, Mapping):
        return tuple((str(k), input_signature(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(input_signature(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value).__name__, *(input_signature(getattr(value, f.name)) for f in dataclasses.fields(value)))
    return type(value).__name__
