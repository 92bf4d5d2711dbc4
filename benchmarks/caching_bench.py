"""Step caching on one GPU: a whole FLUX sampling run without a cache and under each policy, side by side.

FLUX.1-dev's transformer (random bf16 weights, ``flux_model.py``), ``--size`` pixels (default
1024²: 4096 image tokens, 512 text tokens), ``--steps`` Euler steps (default 28) with strictly
decreasing timesteps, as a pipeline would call it (no text encoders or VAE: the transformer's share
of a run is what caching changes). Every configuration runs ``--reps`` times after one warm-up run;
the median wall time is compared with the uncached run's, and with its ideal, the ratio of block
evaluations (``cache_summary``: computed units of all units). Random weights change little from step
to step in some places and a lot in others, so the dynamic policies' hit rates here say nothing about
a trained model's (the quality harness, ``benchmarks/quality/``, measures those); the static masks
compute a fixed number of steps and show what a reused step costs.

    python benchmarks/caching_bench.py --out results/caching        # on a GPU
    python benchmarks/caching_bench.py --tiny --device cpu --size 64 --reps 1   # a CPU smoke run

Under torchrun with several processes the transformer runs on a mesh (``--ring`` ring degree, Ulysses
over the rest; ``parallelize_flux``, eager: a cache and a whole-step CUDA graph do not combine) with
the cache on top, so each policy's speed-up under sequence parallelism can be set beside its speed-up
on one GPU; every rank takes the same decisions (the cache reduces them over the mesh).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from flux_model import FLUX_DEV, build_flux, flux_inputs  # beside this script (its folder is on sys.path)

from models import parallelize_flux
from models.caching import (
    DBCacheConfig,
    cache_summary,
    disable_cache,
    enable_cache,
    first_block_cache,
    static_step_mask,
    steps_mask,
)
from xdit_core import ParallelMesh, init_distributed

# 12 of 28 steps computed: the first 4, then every third, and the last
MASK_12_OF_28 = [1, 1, 1, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 1]


def configurations(steps: int) -> dict[str, DBCacheConfig | None]:
    return {
        "no cache": None,
        "static mask 12 of 28": static_step_mask(MASK_12_OF_28[:steps]),
        "static mask 'medium'": static_step_mask(steps_mask("medium", steps)),
        "static mask 'fast'": static_step_mask(steps_mask("fast", steps)),
        "DBCache F8B0 R0.08 W8 (cache-dit default)": DBCacheConfig(),
        "DBCache F1B0 R0.24 W4 MC3 (SGLang default)": DBCacheConfig(
            Fn_compute_blocks=1, residual_diff_threshold=0.24, max_warmup_steps=4, max_continuous_cached_steps=3
        ),
        "FBCache R0.12 W4": first_block_cache(0.12, max_warmup_steps=4),
        "DBCache F8B8 R0.15 W4": DBCacheConfig(
            Fn_compute_blocks=8, Bn_compute_blocks=8, residual_diff_threshold=0.15, max_warmup_steps=4
        ),
        "TaylorSeer F1B0 R0.24 W4 MC3 order 1": DBCacheConfig(
            Fn_compute_blocks=1,
            residual_diff_threshold=0.24,
            max_warmup_steps=4,
            max_continuous_cached_steps=3,
            enable_taylorseer=True,
            taylorseer_order=1,
        ),
    }


def flux_run(tiny: bool, size: int, device: torch.device) -> tuple[torch.nn.Module, dict]:
    """The transformer and one step's inputs at ``size``²: FLUX.1-dev's (random bf16 weights, 512 text tokens), or
    with ``tiny`` the tests' tiny FLUX (float32, 40 text tokens) for a CPU smoke run."""
    if tiny:
        from models.testing import TINY_FLUX_CONFIG

        config, dtype, text = TINY_FLUX_CONFIG, torch.float32, 40
    else:
        config, dtype, text = FLUX_DEV, torch.bfloat16, 512
    return build_flux(config, device, dtype), flux_inputs(config, size, text, device, dtype)


def sample(model: torch.nn.Module, inputs: dict, steps: int) -> torch.Tensor:
    """Euler from t = 1 to 0 on the packed latents; one transformer call per step."""
    x = inputs["hidden_states"].clone()
    ts = torch.linspace(1.0, 0.0, steps + 1, device=x.device)
    for i in range(steps):
        t = ts[i].expand(x.shape[0]).to(x.dtype)
        v = model(**{**inputs, "hidden_states": x, "timestep": t})[0]
        x = x + (ts[i + 1] - ts[i]) * v
    return x


def timed(fn, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--out", default="results/caching")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="the tiny random FLUX of the tests (float32), for a smoke run")
    p.add_argument("--ring", type=int, default=1, help="under torchrun: the ring degree (Ulysses over the rest)")
    args = p.parse_args()
    device = torch.device(args.device)
    mesh = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = init_distributed().device
        mesh = ParallelMesh.build(ulysses=dist.get_world_size() // args.ring, ring=args.ring)
    model, inputs = flux_run(args.tiny, args.size, device)
    if mesh is not None:
        parallelize_flux(model, mesh)
    say = print if mesh is None or dist.get_rank() == 0 else (lambda *a, **k: None)
    rows = []
    with torch.no_grad():
        exact = sample(model, inputs, args.steps)
        base = None
        units = len(model.transformer_blocks) + len(model.single_transformer_blocks)
        for name, config in configurations(args.steps).items():
            if config is not None and config.Fn_compute_blocks + config.Bn_compute_blocks >= units:
                say(f"{name:<44} skipped: Fn + Bn leave no block of the {units} to cache")
                continue
            if config is not None:
                enable_cache(model, config)
            out = sample(model, inputs, args.steps)  # warm-up run (and its output)
            seconds = statistics.median(
                timed(lambda: sample(model, inputs, args.steps), device) for _ in range(args.reps)
            )
            computed, total = 1, 1
            if config is not None:
                summary = cache_summary(model)
                computed, total = summary["computed_units"], summary["total_units"]
                disable_cache(model)
            base = seconds if base is None else base
            rel = ((out.float() - exact.float()).norm() / exact.float().norm()).item()
            rows.append(
                {
                    "name": name,
                    "label": None if config is None else config.label(),
                    "seconds": seconds,
                    "speedup": base / seconds,
                    "computed_fraction": computed / total,
                    "ideal_speedup": total / computed,
                    "rel_l2_vs_exact": rel,
                }
            )
            r = rows[-1]
            say(
                f"{name:<44} {seconds:7.3f} s  ×{r['speedup']:.2f} (ideal ×{r['ideal_speedup']:.2f}, "
                f"{100 * r['computed_fraction']:.0f}% of blocks)  rel. L2 vs exact {rel:.3g}",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    meta = {"device": gpu, "torch": torch.__version__, "size": args.size, "steps": args.steps, "tiny": args.tiny}
    if mesh is not None:
        meta["mesh"] = mesh.describe()
        if dist.get_rank() != 0:
            return
    (out / "caching_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
