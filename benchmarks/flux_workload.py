"""Sweep workload ``flux``: one FLUX transformer forward (one denoising step), parallel and not.

Rows per image size: on world 1 the plain diffusers model (eager, then regional ``torch.compile``, and
compiled through ``parallelize_flux`` on a mesh of one rank); on larger worlds ``parallelize_flux`` on
every ulysses × ring mesh (text sharded; Ulysses also with text replicated), compiled on the Ulysses
mesh, and, on GPUs, diffusers' own context parallelism (``ContextParallelConfig``, ulysses and ring) as
the peer baseline. Every output is checked against
a float32 forward of the same weights (the bf16 weights cast up): ``max_err`` next to ``ref_err``,
the error of the plain bf16 model, by the flash-attention rule (pass: at most twice that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel
from flux_model import FLUX_DEV, build_flux, flux_inputs  # beside this script (its folder is on sys.path)

from models import parallelize_flux, unparallelize_flux
from models.testing import TINY_FLUX_CONFIG
from xdit_core import ParallelMesh
from xdit_core.graphs import CudaGraphed

FLUX_TINY = TINY_FLUX_CONFIG
TEXT_TOKENS = {"dev": 512, "tiny": 40}


def _references(model: FluxTransformer2DModel, inputs: dict, cache: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(plain output, float32 output) of the plain model; computed once per machine and cached in ``cache``."""
    cached = cache.exists()
    dist.barrier()  # every rank has looked before rank 0 may start writing
    if cached:
        saved = torch.load(cache, map_location=inputs["hidden_states"].device)
        return saved["plain"], saved["fp32"]
    plain = model(**inputs)[0]
    dtype = plain.dtype
    model.float()  # the same (bf16-valued) weights, computed in float32
    try:
        up = {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in inputs.items()}
        fp32 = model(**up)[0]
    finally:
        model.to(dtype)
    if dist.get_rank() == 0:
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"plain": plain, "fp32": fp32}, cache)
    return plain, fp32


def _err(out: torch.Tensor, ref: torch.Tensor, device: torch.device) -> float:
    t = torch.tensor([(out.double() - ref.double()).abs().max().item()], dtype=torch.float64)
    t = t.to(device if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _diffusers_cp(config: dict, device: torch.device, dtype: torch.dtype, **degrees: int) -> FluxTransformer2DModel:
    from diffusers import ContextParallelConfig

    model = build_flux(config, device, dtype)
    model.set_attention_backend("_native_cudnn")
    model.enable_parallelism(config=ContextParallelConfig(**degrees))
    return model


def flux_workload(args: Any, timer: Any) -> Iterator[dict]:
    """Rows for every size in ``args.flux_sizes`` on this world (see the module docstring)."""
    world, device = dist.get_world_size(), timer.device
    gpu = device.type == "cuda"
    config = FLUX_DEV if args.flux_config == "dev" else FLUX_TINY
    dtype = torch.bfloat16 if gpu else torch.float32
    timer = dataclasses.replace(timer, warmup=args.flux_warmup, iters=1, reps=args.flux_reps)
    model = build_flux(config, device, dtype)
    meshes = [(u, world // u) for u in range(world, 0, -1) if world % u == 0] if world > 1 else []
    built = {m: ParallelMesh.build(ulysses=m[0], ring=m[1], device_type=device.type) for m in meshes}
    cases: list[tuple[str, Callable[[], Any]]] = []

    def parallel(mesh: ParallelMesh, text: str, graph: bool = False) -> Callable[[], Any]:
        return lambda: parallelize_flux(model, mesh, text=text, cuda_graph=graph)

    for (u, r), mesh in built.items():
        cases.append((f"ours text=shard u{u}r{r}", parallel(mesh, "shard")))
        if r == 1:
            cases.append((f"ours text=replicate u{u}r{r}", parallel(mesh, "replicate")))
        if gpu and (r == 1 or (u, r) == (2, 2)):
            cases.append((f"ours cuda_graph u{u}r{r}", parallel(mesh, "shard", graph=True)))
    text = TEXT_TOKENS[args.flux_config]
    tol_floor = 1e-5 if dtype == torch.float32 else 0.0
    refs = {}
    for size in args.flux_sizes:
        inputs = flux_inputs(config, size, text, device, dtype)
        with torch.no_grad():
            plain, fp32 = _references(model, inputs, Path(args.out) / f"flux_ref_{args.flux_config}_{size}.pt")
        refs[size] = (inputs, fp32, _err(plain, fp32, device))
        del plain

    def row(size: int, variant: str, mesh: str, runner: torch.nn.Module, **extra: Any) -> dict:
        inputs, fp32, ref_err = refs[size]

        def fn() -> Any:
            return runner(**inputs)

        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            err = _err(fn()[0], fp32, device)  # also the warm-up (and compilation) call
            ms = timer(fn)
        return {
            "workload": "flux", "shape": f"{size}x{size} ({(size // 16) ** 2}+{text} tok)", "world": world,
            "backend": "auto", "ref_err": ref_err, "graph_ms": None, "variant": variant, "mesh": mesh,
            "median_ms": ms, "max_err": err, "ok": err <= 2 * ref_err + tol_floor,
            "peak_gib": torch.cuda.max_memory_allocated(device) / 2**30 if gpu else None, **extra,
        }  # fmt: skip

    for size in refs:
        if world == 1:
            yield row(size, "single", "1", model, backend="sdpa")
            if gpu:
                yield row(size, "single cuda_graph", "1", CudaGraphed(model), backend="sdpa", baseline=True)
        for name, apply in cases:
            apply()
            try:
                yield row(size, name.split(" u")[0], name.split(" ")[-1], model)
            except RuntimeError as e:  # a failed graph capture is reported; every rank fails it alike
                if "cuda_graph" not in name:
                    raise
                print(f"  world {world} {name} {size}: FAILED: {e}", flush=True)
            finally:
                unparallelize_flux(model)
        if gpu and world > 1 and args.flux_baselines:
            for kind in ("ulysses", "ring"):
                peer = _diffusers_cp(config, device, dtype, **{f"{kind}_degree": world})
                mesh_name = f"u{world}r1" if kind == "ulysses" else f"u1r{world}"
                yield row(size, f"diffusers cp {kind}", mesh_name, peer, backend="cudnn", baseline=True)
                del peer
                torch.cuda.empty_cache()
    if args.flux_compile:  # regional torch.compile (each block): plain on world 1, ours on the Ulysses mesh
        model.compile_repeated_blocks(dynamic=False)
        mesh = built.get((world, 1))
        if mesh is not None:
            parallelize_flux(model, mesh)
        for size in refs:
            variant, mesh_name = ("single compiled", "1") if mesh is None else ("ours compiled", f"u{world}r1")
            yield row(size, variant, mesh_name, model, backend="sdpa" if mesh is None else "auto")
        if gpu:  # compiled blocks, replayed from a CUDA graph
            graphed: Any = CudaGraphed(model)
            if mesh is not None:
                unparallelize_flux(model)
                parallelize_flux(model, mesh, cuda_graph=True)
                graphed = model
            for size in refs:
                variant, mesh_name = ("single", "1") if mesh is None else ("ours", f"u{world}r1")
                backend = "sdpa" if mesh is None else "auto"
                yield row(size, f"{variant} compiled+graph", mesh_name, graphed, backend=backend, baseline=mesh is None)
        if world == 1:  # and ours on a mesh of one rank: the product's path (the attention one custom op)
            parallelize_flux(model, ParallelMesh.build(ulysses=1, device_type=device.type))
            try:
                for size in refs:
                    yield row(size, "ours compiled", "u1r1", model)
            finally:
                unparallelize_flux(model)
