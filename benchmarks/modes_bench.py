"""FLUX's transformer on a mesh, one whole sampling run per mode, side by side: what the 4-GPU run compares.

Under torchrun (2 or more processes; Ulysses over the ranks, ``--ring`` ring degree), FLUX.1-dev's
transformer (random bf16 weights, ``flux_model.py``) at ``--size``² runs ``--steps`` Euler steps
(``caching_bench.sample``: strictly decreasing timesteps, as a pipeline calls it) in each mode:

* ``exact``: ``parallelize_flux`` (text sharded), the reference;
* ``displaced``: ``parallelize_flux_displaced`` with ``--warmup`` exact steps, then stale K/V (inexact);
* ``no-comm``: the exact mode's split and gather, but every attention over this rank's own tokens only:
  the no-communication bound of any patch-parallel scheme (its output is not an image of anything);
* with ``--tp``: the exact and no-comm modes on a mesh with that tensor-parallel degree (the weights' Linears
  split over it; Ulysses over the rest);
* ``sharded``: the exact mode with the weights sharded by FSDP2 over the sequence-parallel ranks
  (``shard_weights``; one block gathered at a time, the next prefetched). Sharding is one-way, so this
  mode runs last.

Per mode: the median wall time of ``--reps`` runs after one warm-up run, the time per step, the peak
memory of the slowest rank, the parameter bytes one rank holds (``models.tensor_parallel.parameter_bytes``),
and the relative L2 distance of the output from the exact run's (``exact``
and ``sharded`` must agree to rounding; ``displaced`` differs by design). Rank 0 writes
``--out``/modes_bench.json.

    torchrun --nproc_per_node 4 benchmarks/modes_bench.py --out results/modes
    torchrun --nproc_per_node 2 benchmarks/modes_bench.py --tiny --size 64 --steps 4 --reps 1 --out /tmp/modes
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.distributed as dist
from caching_bench import flux_run, sample, timed  # beside this script (its folder is on sys.path)

from attention import attention_with_lse
from models import parallelize_flux, parallelize_flux_displaced, unparallelize_flux, unparallelize_flux_displaced
from models.flux.processor import FluxSequenceParallelProcessor
from models.sharding import shard_weights
from models.tensor_parallel import parameter_bytes
from xdit_core import ParallelMesh, init_distributed

MODES = ("exact", "displaced", "no-comm", "sharded")


class LocalOnlyProcessor(FluxSequenceParallelProcessor):
    """The exact processor with the attention over this rank's own tokens only (no communication): a bound."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention_with_lse(q, k, v, backend=self.backend)[0]


def no_comm(model: torch.nn.Module) -> dict:
    """Swap the exact mode's processors for :class:`LocalOnlyProcessor` ones; returns the originals."""
    originals = model.attn_processors
    first = next(iter(originals.values()))
    model.set_attn_processor(LocalOnlyProcessor(first.mesh, first.context, backend=first.backend))
    return originals


def peak_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    peak = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30], device=device)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return round(peak.item(), 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1, help="displaced: exact warm-up steps")
    p.add_argument("--ring", type=int, default=1, help="ring degree (Ulysses over the rest)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (exact, no-comm and sharded modes)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--tiny", action="store_true", help="the tests' tiny FLUX in float32 (a CPU smoke run)")
    p.add_argument("--out", default="results/modes")
    args = p.parse_args()
    ctx = init_distributed()
    if ctx.world_size < 2:
        raise SystemExit("modes_bench.py compares parallel modes: run it with torchrun --nproc_per_node 2 or more")
    if ctx.world_size % (args.ring * args.tp):
        raise SystemExit(f"--ring {args.ring} × --tp {args.tp} does not divide the {ctx.world_size} processes")
    device = ctx.device
    mesh = ParallelMesh.build(ulysses=ctx.world_size // (args.ring * args.tp), ring=args.ring, tp=args.tp)
    modes = [m for m in args.modes if not (args.tp > 1 and m in ("displaced", "sharded"))]
    if modes != args.modes:
        print("modes_bench: with --tp, the displaced and sharded modes do not apply (refused by the library)")
    model, inputs = flux_run(args.tiny, args.size, device)
    say = print if ctx.rank == 0 else (lambda *a, **k: None)
    rows, exact = [], None
    # sharding is one-way: it runs last, whatever the order asked
    for mode in sorted(modes, key=MODES.index):
        if mode == "displaced":
            parallelize_flux_displaced(model, mesh, warmup_steps=args.warmup)
        else:
            parallelize_flux(model, mesh)
        originals = no_comm(model) if mode == "no-comm" else None
        if mode == "sharded":
            shard_weights(model, mesh, axis="sp")
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            out = sample(model, inputs, args.steps).float()  # the warm-up run, and the output compared
            seconds = statistics.median(
                timed(lambda: sample(model, inputs, args.steps), device) for _ in range(args.reps)
            )
        exact = out if mode == "exact" else exact
        rel = None if exact is None else ((out - exact).norm() / exact.norm()).item()
        rows.append(
            {
                "mode": mode, "seconds": round(seconds, 4), "step_ms": round(1e3 * seconds / args.steps, 2),
                "peak_gib": peak_gib(device), "param_gib": round(parameter_bytes(model) / 2**30, 3),
                "rel_l2_vs_exact": rel,
                **({"warmup_steps": args.warmup} if mode == "displaced" else {}),
            }
        )  # fmt: skip
        r = rows[-1]
        say(f"{mode:<10} {seconds:8.3f} s  {r['step_ms']:8.2f} ms/step  peak {r['peak_gib']} GiB  rel. L2 {rel}")
        if originals is not None:
            model.set_attn_processor(originals)
        if mode == "displaced":
            unparallelize_flux_displaced(model)
        elif mode != "sharded":
            unparallelize_flux(model)
    if ctx.rank == 0:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        meta = {
            "device": gpu, "world": ctx.world_size, "mesh": mesh.describe(), "size": args.size, "steps": args.steps,
            "torch": torch.__version__, "tiny": args.tiny,
        }  # fmt: skip
        (out_dir / "modes_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
