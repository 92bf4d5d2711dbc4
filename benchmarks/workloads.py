"""Sweep workloads: each yields one row per (shape, variant, mesh), checked against one device."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from checks import agreed_max

from attention import (
    BACKEND_NAMES,
    AttentionCall,
    attention_with_lse,
    available_backends,
    ring_attention,
    ulysses_attention,
    usp_attention,
)
from xdit_core import ParallelMesh, all_gather
from xdit_core.collectives import split_sizes


def allgather_kv_attention(q, k, v, group: dist.ProcessGroup, lengths: list[int]):
    """Peer baseline: all-gather K and V (one collective), then local attention of the local queries."""
    full = all_gather(torch.stack((k, v)), group, dim=2, sizes=lengths)  # [2, B, S, H, D]
    return attention_with_lse(q, full[0], full[1])[0]


def _variants(mesh: ParallelMesh, args: Any, seq: int) -> Iterator[tuple[str, Callable[..., Any]]]:
    """``(name, fn(q, k, v))``; a name's second word, if it is a backend, is the kernel used."""
    u, r, wanted = mesh.ulysses_size, mesh.ring_size, args.variants
    if mesh.ulysses_exchange is not None:  # a peer mesh: Ulysses' all-to-alls through symmetric memory
        if r == 1:
            yield "ulysses peer", lambda q, k, v: ulysses_attention(q, k, v, mesh.ulysses_exchange, seq_len=seq)
        else:
            yield "usp peer", lambda q, k, v: usp_attention(q, k, v, mesh, seq_len=seq)
        return
    if r == 1 and "ulysses" in wanted:
        group = mesh.ulysses_group
        yield "ulysses", lambda q, k, v: ulysses_attention(q, k, v, group, seq_len=seq)
        for name in args.ulysses_backends:
            yield f"ulysses {name}", lambda q, k, v, n=name: ulysses_attention(q, k, v, group, seq_len=seq, backend=n)
    if u == 1 and "ring" in wanted:
        yield "ring", lambda q, k, v: ring_attention(q, k, v, mesh.ring_group, seq_len=seq)
    if u > 1 and r > 1 and "usp" in wanted:
        yield "usp", lambda q, k, v: usp_attention(q, k, v, mesh, seq_len=seq)
    if u == mesh.sp_size and "allgather_kv" in wanted:
        lengths = split_sizes(seq, mesh.sp_size)
        yield "allgather_kv", lambda q, k, v: allgather_kv_attention(q, k, v, mesh.sp_group, lengths)


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Attention in high precision (float64 on CPU, float32 on GPU) in [B, S, H, D]."""
    hi = torch.float64 if q.device.type == "cpu" else torch.float32
    out = F.scaled_dot_product_attention(*(x.to(hi).transpose(1, 2) for x in (q, k, v)))
    return out.transpose(1, 2)


def attention_workload(args: Any, timer: Any) -> Iterator[dict]:
    """Ulysses / ring / USP (and the all-gather-KV baseline) over every mesh of this world."""
    world, rank = dist.get_world_size(), dist.get_rank()
    device = timer.device
    meshes = [(u, world // u) for u in range(world, 0, -1) if world % u == 0]
    built = {m: ParallelMesh.build(ulysses=m[0], ring=m[1], device_type=device.type) for m in meshes}
    if device.type == "cuda" and "peer" in args.variants:  # the same meshes with a PeerExchange
        for u, r in (m for m in meshes if m[0] > 1):
            built[(u, r, "peer")] = ParallelMesh.build(ulysses=u, ring=r, peer_exchange=True)
    for seq in args.seq:
        shape = (args.batch, seq, args.heads, args.head_dim)
        label = f"B{shape[0]} S{seq} H{shape[2]} D{shape[3]}"
        gen = torch.Generator(device).manual_seed(seq)
        q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=args.dtype_t) for _ in range(3))
        rows = torch.tensor_split(torch.arange(seq, device=device), world)[rank]  # sp_rank == rank (batch 1)
        q_local, k_local, v_local = (x[:, rows].contiguous() for x in (q, k, v))
        ref = _reference(q_local, k, v)
        single = attention_with_lse(q_local, k, v, backend=args.backend)[0]
        ref_err = agreed_max((single.double() - ref.double()).abs().max().item(), device)
        backend = available_backends(AttentionCall(device, args.dtype_t, args.head_dim, False))[0]
        if args.backend != "auto":
            backend = args.backend
        common = {"workload": "attention", "shape": label, "world": world, "backend": backend, "ref_err": ref_err}
        if world == 1:
            fn = partial(attention_with_lse, q, k, v, backend=args.backend)
            times = {"median_ms": timer(fn), "graph_ms": timer.graph(fn)}
            yield {**common, "variant": "single", "mesh": "1", **times, "max_err": ref_err, "ok": True}
            kernels = available_backends(AttentionCall(device, args.dtype_t, args.head_dim, False))
            for name in kernels if args.backend == "auto" else []:  # each kernel on its own, for reference
                out = attention_with_lse(q_local, k, v, backend=name)[0]
                err = agreed_max((out.double() - ref.double()).abs().max().item(), device)
                fn = partial(attention_with_lse, q, k, v, backend=name)
                times = {"median_ms": timer(fn), "graph_ms": timer.graph(fn)}
                row = {**common, "backend": name, "variant": f"single {name}", "mesh": "1", **times}
                yield {**row, "max_err": err, "ok": err <= max(2 * ref_err, 1e-5)}
            continue
        for (u, r, *_), mesh in built.items():
            for variant, fn in _variants(mesh, args, seq):
                out = fn(q_local, k_local, v_local)
                err = agreed_max((out.double() - ref.double()).abs().max().item(), device)
                tol = max(2 * ref_err, 1e-5 if args.dtype_t == torch.float32 else 0.0)
                call = partial(fn, q_local, k_local, v_local)
                times = {"median_ms": timer(call), "graph_ms": timer.graph(call)}
                words = variant.split()
                kernel = {"backend": words[1]} if len(words) == 2 and words[1] in BACKEND_NAMES else {}
                row = {**common, **kernel, "variant": variant, "mesh": f"u{u}r{r}", **times}
                yield {**row, "max_err": err, "ok": err <= tol}
