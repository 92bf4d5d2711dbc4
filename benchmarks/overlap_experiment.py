"""Experiment: can Ulysses' all-to-alls overlap the attention kernel if they get their own SMs?

NCCL's collectives are kernels; FA3 occupies every SM, so a chunked (pipelined) Ulysses gains nothing
by default. Here NCCL is capped at ``max_ctas`` CTAs (a communicator option) and FA3 leaves
``sm_margin`` SMs free, so both can run at once. Prints eager and CUDA-graph times per call for
``head_chunks`` 1..3 and several caps (4 GPUs, FLUX shapes)::

    torchrun --nproc_per_node 4 benchmarks/overlap_experiment.py
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import torch
import torch.distributed as dist

from attention.ulysses import ulysses_core
from xdit_core import init_distributed


def _time(fn, iters: int = 20, reps: int = 7) -> float:
    samples = []
    for _ in range(reps):
        torch.cuda.synchronize()
        dist.barrier()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / iters)
    t = torch.tensor([statistics.median(samples)], device="cuda", dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _graph_time(fn) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _time(graph.replay)


def _group(max_ctas: int | None) -> dist.ProcessGroup:
    if max_ctas is None:
        return dist.new_group(list(range(dist.get_world_size())))
    opts = dist.ProcessGroupNCCL.Options()
    opts.config.max_ctas = max_ctas
    opts.config.min_ctas = 1
    return dist.new_group(list(range(dist.get_world_size())), pg_options=opts)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, nargs="+", default=[4608, 16896])
    args = p.parse_args()
    ctx = init_distributed()
    import fa3_fwd_interface as fa3

    world = ctx.world_size
    settings = [(None, 0), (4, 4), (8, 8), (16, 16), (8, 0)]
    groups = {}
    for max_ctas, _ in settings:
        if max_ctas not in groups:
            try:
                groups[max_ctas] = _group(max_ctas)
            except Exception as e:
                if ctx.rank == 0:
                    print(f"max_ctas={max_ctas}: {type(e).__name__}: {e}")
    for seq in args.seq:
        gen = torch.Generator("cuda").manual_seed(0)
        shape = (1, seq // world, 24, 128)
        q, k, v = (torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        scale = 128**-0.5
        ref = None
        if ctx.rank == 0:
            print(f"\n== S={seq} on {world} GPUs: ms per call, eager / graph (slowest rank, median)")
        for max_ctas, margin in settings:
            if max_ctas not in groups:
                continue
            group = groups[max_ctas]

            def inner(q_, k_, v_, margin=margin, scale=scale):
                return fa3._flash_attn_forward(q_, k_, v_, softmax_scale=scale, sm_margin=margin)[0]

            for chunks in (1, 2, 3):
                fn = partial(ulysses_core, q, k, v, group, inner, chunks)
                out = fn()
                ref = out if ref is None else ref
                same = torch.equal(out, ref)
                eager, graph = _time(fn), _graph_time(fn)
                if ctx.rank == 0:
                    print(
                        f"  max_ctas={max_ctas!s:>4} sm_margin={margin:>2} head_chunks={chunks}: "
                        f"{eager:.3f} / {graph:.3f}  {'same output' if same else 'OUTPUT DIFFERS'}",
                        flush=True,
                    )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
