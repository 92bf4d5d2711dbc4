"""Where the time of one sequence-parallel attention call goes (GPUs, under torchrun).

    torchrun --nproc_per_node 4 benchmarks/profile_attention.py --seq 4608

For each variant it prints, on rank 0 (slowest rank's medians): GPU time per call back to back, CPU
time to issue one call (if this is close to the GPU time the call is launch-bound), the time of a
CUDA-graph replay of the same call (device time without any CPU overhead), and the parts alone: the
q/k/v all-to-all, the output all-to-all and the local attention kernel.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from sweep import Timer  # the sweep's timer (this script runs from benchmarks/)

from attention import attention_with_lse, ring_attention, ulysses_attention, usp_attention
from xdit_core import ParallelMesh, init_distributed


def _cpu_issue(fn, iters: int) -> float:
    """Milliseconds of host time to issue one call (slowest rank), the device left to catch up after."""
    torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t = torch.tensor([(time.perf_counter() - t0) * 1e3 / iters], device="cuda", dtype=torch.float64)
    torch.cuda.synchronize()
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _profile(seq: int, first: bool, args: argparse.Namespace, ctx, meshes: dict) -> None:
    world = ctx.world_size
    gen = torch.Generator("cuda").manual_seed(0)
    shape = (1, seq // world, args.heads, args.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    group = meshes[(world, 1)].ulysses_group
    hp = args.heads // world
    full = (1, seq, hp, args.head_dim)
    qf, kf, vf = (torch.randn(full, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    send3 = torch.randn((3, *shape), device="cuda", dtype=torch.bfloat16)
    recv3, send1 = torch.empty_like(send3), send3[0].clone()
    recv1 = torch.empty_like(send1)
    variants = {
        "ulysses (auto kernel)": lambda: ulysses_attention(q, k, v, group),
        "ulysses cudnn": lambda: ulysses_attention(q, k, v, group, backend="cudnn"),
        "ring": lambda: ring_attention(q, k, v, meshes[(1, world)].ring_group),
        "ring cudnn": lambda: ring_attention(q, k, v, meshes[(1, world)].ring_group, backend="cudnn"),
        "  part: qkv all-to-all": lambda: dist.all_to_all_single(recv3, send3, group=group),
        "  part: qkv all-to-all, async+wait": lambda: dist.all_to_all_single(
            recv3, send3, group=group, async_op=True
        ).wait(),
        "  part: out all-to-all": lambda: dist.all_to_all_single(recv1, send1, group=group),
        "  part: attention fa3 [S, H/P]": lambda: attention_with_lse(qf, kf, vf, backend="fa3"),
        "  part: attention cudnn [S, H/P]": lambda: attention_with_lse(qf, kf, vf, backend="cudnn"),
    }
    if (2, world // 2) in meshes and world > 2:
        variants["usp u2"] = lambda: usp_attention(q, k, v, meshes[(2, world // 2)])
    if ctx.rank == 0:
        print(f"\n== world {world}, S={seq}, local {tuple(shape)}; ms per call (slowest rank, median)")
        print(f"{'variant':<34} {'gpu back-to-back':>16} {'cpu issue':>10} {'graph replay':>14}")
    timer = Timer(torch.device("cuda"), warmup=3, iters=args.iters, reps=args.reps)
    for name, fn in variants.items():
        gpu = timer(fn)
        cpu = _cpu_issue(fn, args.iters)
        graph = timer.graph(fn)
        if ctx.rank == 0:
            print(f"{name:<34} {gpu:16.3f} {cpu:10.3f} {graph:14.3f}", flush=True)
    if ctx.rank == 0 and first:
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            for _ in range(5):
                ulysses_attention(q, k, v, group)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=48))
    elif first:
        for _ in range(5):
            ulysses_attention(q, k, v, group)
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, nargs="+", default=[4608, 16896])
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()
    ctx = init_distributed()
    world = ctx.world_size
    meshes = {(u, world // u): ParallelMesh.build(ulysses=u, ring=world // u) for u in (world, 2, 1) if world % u == 0}
    for i, seq in enumerate(args.seq):
        _profile(seq, i == 0, args, ctx, meshes)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
