"""What the rank-agreement check (``xdit_core.agreement``) costs: the same work with ``check_ranks`` on and off.

Launch once per world size (GPUs, NCCL)::

    torchrun --nproc_per_node 2 benchmarks/check_overhead.py --out results/check

Rows (median of interleaved repetitions, on and off alternating so drift hits both alike):
- ``flux step``: one FLUX.1-dev transformer forward at ``--size`` (random bf16 weights), parallelized on
  a Ulysses mesh of the whole world, eager and replayed from a CUDA graph; the outputs of the two
  settings must be bitwise equal.
- ``ulysses call``: one eager ``ulysses_attention`` at FLUX's 1024² sequence (4608 tokens, 24 heads of
  128), host-bound at this size, so any host cost of the check shows; per call, over a batch of calls.
- ``host cost``: the check's own host time per call once its signature is known (what every step after
  the first pays), on two gloo processes of the host: ``check_sequence_call`` of a FLUX 1024² attention
  call on 2 ranks, and the FLUX adapter's input check, with the check on minus off (microseconds).
A first call with each setting (where the check exchanges its digest) is made before timing. On one
GPU the FLUX rows show that a world of one pays nothing (no check runs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from flux_model import FLUX_DEV, build_flux, flux_inputs  # beside this script (its folder is on sys.path)

from attention import ulysses_attention
from models import parallelize_flux, unparallelize_flux
from xdit_core import ParallelMesh, init_distributed, shard_sequence, spawn


def _interleaved(fns: dict[str, object], reps: int, calls: int) -> dict[str, float]:
    """Median milliseconds per call of each ``fn`` (``calls`` calls per timing), the settings alternating."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            torch.cuda.synchronize()
            times[name].append((time.perf_counter() - start) * 1e3 / calls)
    return {name: statistics.median(t) for name, t in times.items()}


def _host_cost(calls: int) -> dict[str, float]:
    """Microseconds per call that the known-signature check adds, on this (gloo) rank."""
    from attention.checks import check_sequence_call
    from xdit_core.agreement import agreed, input_signature

    torch.set_num_threads(1)
    group = dist.group.WORLD
    q = torch.empty(1, 2304, 24, 128, dtype=torch.bfloat16)  # a rank's share of FLUX 1024² (never computed)
    flux_call = flux_inputs(FLUX_DEV, 1024, 512, torch.device("cpu"), torch.bfloat16)

    def attention(on: bool) -> None:
        check_sequence_call(
            q, q, q, group=group, group_rank=group.rank(), seq_len=4608, kv_seq_len=None, kv_replicated=False,
            key_mask=None, joint=None, joint_key_mask=None, scale=None, backend="math", return_lse=False,
            check_ranks=on, what="ulysses_attention",
        )  # fmt: skip

    def adapter(on: bool) -> None:
        names = tuple(flux_call)  # as the FLUX adapter does
        agreed(
            group, "parallel FLUX", on, lambda: None, names, lambda _: tuple(map(input_signature, flux_call.values()))
        )

    costs = {}
    for name, fn in (("attention call", attention), ("FLUX adapter call", adapter)):
        fn(True)  # agree once
        per_call = {}
        for on in (True, False, True, False):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(calls):
                fn(on)
            per_call.setdefault(on, []).append((time.perf_counter() - start) * 1e6 / calls)
        costs[name] = min(per_call[True]) - min(per_call[False])
    return costs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024, help="FLUX image side in pixels (multiple of 16)")
    p.add_argument("--reps", type=int, default=9)
    p.add_argument("--out", default="results/check")
    args = p.parse_args()
    ctx = init_distributed()
    if ctx.device.type != "cuda":
        raise SystemExit("check_overhead.py times GPUs: launch it under torchrun on a CUDA machine")
    world = ctx.world_size
    meshes = {on: ParallelMesh.build(ulysses=world, check_ranks=on) for on in (True, False)}
    rows = []
    if ctx.rank == 0:
        costs = spawn(_host_cost, 2, 20000, backend="gloo")[0]
        rows += [
            {"what": f"host cost: {name}", "setting": "on - off", "world": 2, "us": us} for name, us in costs.items()
        ]
    dist.barrier()

    # ---- one eager ulysses_attention call at FLUX 1024²'s sequence (host-bound)
    seq = 4608
    gen = torch.Generator(ctx.device).manual_seed(0)
    q, k, v = (torch.randn(1, seq, 24, 128, generator=gen, device=ctx.device, dtype=torch.bfloat16) for _ in range(3))
    local = [shard_sequence(x, meshes[True]) for x in (q, k, v)]
    calls = {
        f"check {'on' if on else 'off'}": (
            lambda on=on: ulysses_attention(*local, meshes[on].ulysses_group, seq_len=seq, check_ranks=on)
        )
        for on in (True, False)
    }
    with torch.no_grad():
        for fn in calls.values():
            fn()  # the first call agrees (check on) and picks the kernel
        ms = _interleaved(calls, args.reps, calls=50)
    rows += [{"what": "ulysses call S=4608", "setting": s, "world": world, "ms": t} for s, t in ms.items()]

    # ---- the FLUX step, eager and from a CUDA graph: two instances with the same weights, one per setting
    inputs = flux_inputs(FLUX_DEV, args.size, 512, ctx.device, torch.bfloat16)
    models = {on: build_flux(FLUX_DEV, ctx.device, torch.bfloat16) for on in (True, False)}
    for graph in (False, True):
        for on, model in models.items():
            parallelize_flux(model, meshes[on], cuda_graph=graph)
        steps = {on: (lambda m=model: m(**inputs)) for on, model in models.items()}
        with torch.no_grad():
            outputs = {on: step()[0] for on, step in steps.items()}  # the check agrees; a graph is captured
            ms = _interleaved({f"check {'on' if on else 'off'}": step for on, step in steps.items()}, args.reps, 1)
        same = bool(torch.equal(outputs[True], outputs[False]))
        kind = "cuda_graph" if graph else "eager"
        rows += [
            {"what": f"flux step {args.size}² {kind}", "setting": s, "world": world, "ms": t, "bitwise_equal": same}
            for s, t in ms.items()
        ]
        for model in models.values():
            unparallelize_flux(model)
    if ctx.rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"check_overhead_world{world}.json").write_text(json.dumps(rows, indent=1))
        for row in rows:
            value = f"{row['ms']:9.3f} ms" if "ms" in row else f"{row['us']:9.2f} us"
            print(f"world {row['world']}  {row['what']:<28} {row['setting']:<10} {value}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
