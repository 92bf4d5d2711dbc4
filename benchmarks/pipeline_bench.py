"""The whole FLUX.1-dev pipeline on one or several GPUs, with each stage's time: text encoders, the steps, the decode.

``torchrun --nproc_per_node N benchmarks/pipeline_bench.py``: the pipeline of ``flux_pipeline_model.py``
(T5-XXL, CLIP-L, the transformer, the VAE; random weights, bf16) at ``--size``² for ``--steps`` steps, through
``parallelize_flux_pipeline`` on a Ulysses mesh over the N ranks (the parallel VAE included; ``--cuda-graph``
replays each step from a CUDA graph, ``--compile`` compiles the transformer's blocks), one warm-up call, then
``--reps`` timed calls. Each stage is timed with CUDA events recorded around the components' calls (no
synchronisation inside the call, so the total is the pipeline's own): ``text`` (CLIP and T5 on rank 0), ``steps``
(every transformer call, summed), ``decode`` (the VAE), and ``other`` (the rest: scheduler, latents, the
broadcasts). It reports the medians and checks the issue-20 budget: the whole call within ``steps × one step +
0.35 s``. Rank 0 writes ``--out``/pipeline_bench.json.

    torchrun --nproc_per_node 1 benchmarks/pipeline_bench.py --out results/pipeline
    torchrun --nproc_per_node 2 benchmarks/pipeline_bench.py --tiny --steps 3 --reps 1 --out /tmp/pipeline
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from models import parallelize_flux_pipeline
from models.testing import tiny_flux_pipeline
from xdit_core import ParallelMesh, init_distributed


class StageClock:
    """Events around each call of the watched modules' ``method`` (CUDA events, or host times on the CPU);
    :meth:`seconds` after a synchronised call."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.marks: dict[str, list[tuple]] = {}
        self.restore: list[Callable[[], None]] = []

    def watch(self, stage: str, module: torch.nn.Module | None, method: str = "forward") -> None:
        if module is None:  # a rank without text encoders
            return
        original = getattr(module, method)
        marks = self.marks.setdefault(stage, [])

        def timed(*args, **kwargs):
            start = self._mark()
            out = original(*args, **kwargs)
            marks.append((start, self._mark()))
            return out

        own = module.__dict__.get(method)  # an instance attribute already (a hook chain's wrapper), or None
        setattr(module, method, timed)
        self.restore.append(lambda: setattr(module, method, own) if own is not None else delattr(module, method))

    def close(self) -> None:
        """Put every watched method back."""
        for undo in reversed(self.restore):
            undo()
        self.restore.clear()

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def seconds(self) -> dict[str, float]:
        """Each stage's summed time over the marks since the last call, in seconds; clears them."""
        out = {}
        for stage, marks in self.marks.items():
            if self.cuda:
                out[stage] = sum(a.elapsed_time(b) for a, b in marks) / 1e3
            else:
                out[stage] = sum(b - a for a, b in marks)
            marks.clear()
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cuda-graph", action="store_true", help="replay each step from a CUDA graph")
    p.add_argument("--compile", action="store_true", help="compile the transformer's blocks (fullgraph)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny pipeline in float32 (a CPU smoke run)")
    p.add_argument("--out", default="results/pipeline")
    args = p.parse_args()
    ctx = init_distributed()
    device, cuda = ctx.device, ctx.device.type == "cuda"
    mesh = ParallelMesh.build(ulysses=ctx.world_size)
    if args.tiny:
        pipe, size = tiny_flux_pipeline(seed=0), 32
    else:
        from flux_pipeline_model import build_flux_dev_pipeline  # beside this script

        pipe, size = build_flux_dev_pipeline(device), args.size
    parallel = parallelize_flux_pipeline(pipe, mesh, cuda_graph=args.cuda_graph)
    if args.compile:  # the attention is a custom op: each block compiles into one graph
        pipe.transformer.compile_repeated_blocks(fullgraph=True, dynamic=False)
    clock = StageClock(cuda)
    clock.watch("text", pipe.text_encoder)
    clock.watch("text", pipe.text_encoder_2)
    clock.watch("steps", pipe.transformer)
    clock.watch("decode", pipe.vae, "decode")
    call = dict(height=size, width=size, num_inference_steps=args.steps, guidance_scale=3.5, output_type="pt")
    prompt = "a red fox running through fresh snow at sunrise, cinematic"
    rows = []
    for rep in range(args.reps + 1):  # the first call warms up (and captures graphs)
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        parallel(prompt, generator=torch.Generator().manual_seed(0), **call)
        if cuda:
            torch.cuda.synchronize(device)
        total = time.perf_counter() - start
        stages = clock.seconds()
        if rep:
            rows.append({"total_s": total, **{f"{k}_s": v for k, v in stages.items()}})
    clock.close()
    median = {key: statistics.median(r.get(key, 0.0) for r in rows) for key in rows[0]}
    tensor = torch.tensor([median[k] for k in sorted(median)], dtype=torch.float64, device=device if cuda else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)  # the slowest rank's figures (text runs on rank 0 only)
    median = dict(zip(sorted(median), (round(v, 4) for v in tensor.tolist()), strict=True))
    median["other_s"] = round(median["total_s"] - sum(v for k, v in median.items() if k != "total_s"), 4)
    step = median.get("steps_s", 0.0) / args.steps
    budget = args.steps * step + 0.35
    if ctx.rank == 0:
        print(json.dumps({**median, "step_ms": round(1e3 * step, 2), "budget_s": round(budget, 3)}))
        print(f"whole call {median['total_s']:.3f} s against steps × one step + 0.35 s = {budget:.3f} s: "
              f"{'within' if median['total_s'] <= budget else 'OVER'}")  # fmt: skip
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
        meta = {"device": gpu, "world": ctx.world_size, "size": size, "steps": args.steps, "tiny": args.tiny,
                "cuda_graph": args.cuda_graph, "compile": args.compile, "torch": torch.__version__}  # fmt: skip
        (out / "pipeline_bench.json").write_text(json.dumps({"meta": meta, "median": median, "runs": rows}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
