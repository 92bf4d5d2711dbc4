"""Scaling sweep: time and check every sequence-parallel primitive over world sizes and meshes.

On a CPU (the default) it spawns gloo worlds of 1, 2 and 4 processes itself and uses small shapes::

    python benchmarks/sweep.py

That is a smoke test: every result is checked, but processes sharing a few cores measure no speed, and
the table and the plot say so.

On GPUs, launch one torchrun per world size (NCCL, real FLUX sizes), then merge the results::

    for n in 1 2 4; do torchrun --nproc_per_node $n benchmarks/sweep.py --out results; done
    python benchmarks/sweep.py --report results

Every row is checked against single-device attention on the same inputs; the table gives the
median time per call of the slowest rank, the speedup over one device and the error. Results go to
``<out>/sweep.json``, ``sweep.csv`` and ``speedup.png``. Workloads are functions in ``WORKLOADS``
that yield rows, so model-level workloads (FLUX transformer, VAE decode) plug in beside attention.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baselines import check as check_baselines
from baselines import load as load_baselines
from cli_types import OneLineParser, int_at_least, int_list, name_list
from workloads import attention_workload

from attention import BACKEND_NAMES
from xdit_core import ParallelMesh, init_distributed, spawn


def flux_workload(args: argparse.Namespace, timer: Timer) -> Iterator[dict]:
    """The FLUX transformer step (``flux_workload.py``; imported here: it needs diffusers)."""
    from flux_workload import flux_workload as workload

    return workload(args, timer)


def vae_workload(args: argparse.Namespace, timer: Timer) -> Iterator[dict]:
    """The VAE decode (``vae_workload.py``; imported here: it needs diffusers)."""
    from vae_workload import vae_workload as workload

    return workload(args, timer)


def stdit_workload(args: argparse.Namespace, timer: Timer) -> Iterator[dict]:
    """The STDiT3 step (``stdit_workload.py``)."""
    from stdit_workload import stdit_workload as workload

    return workload(args, timer)


WORKLOADS: dict[str, Callable[[argparse.Namespace, Timer], Iterator[dict]]] = {
    "attention": attention_workload,
    "flux": flux_workload,
    "vae": vae_workload,
    "stdit": stdit_workload,
}


@dataclass
class Timer:
    """Median per-call time of the slowest rank: ``reps`` timed loops of ``iters`` calls each."""

    device: torch.device
    warmup: int
    iters: int
    reps: int

    def __call__(self, fn: Callable[[], object]) -> float:
        for _ in range(self.warmup):
            fn()
        samples = []
        for _ in range(self.reps):
            self._sync()
            dist.barrier()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(self.iters):
                    fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / self.iters)
            else:
                t0 = time.perf_counter()
                for _ in range(self.iters):
                    fn()
                samples.append((time.perf_counter() - t0) * 1e3 / self.iters)
        median = torch.tensor([statistics.median(samples)], dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(median, op=dist.ReduceOp.MAX)
        return median.item()

    def graph(self, fn: Callable[[], object]) -> float | None:
        """The same measurement for a CUDA-graph replay of ``fn``: device time without CPU overhead."""
        if self.device.type != "cuda":
            return None
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = self(graph.replay)
        del graph
        return ms

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def meshes_for(world: int) -> list[tuple[int, int]]:
    """Every ``(ulysses, ring)`` with product ``world``."""
    return [(u, world // u) for u in range(world, 0, -1) if world % u == 0]


def run_world(args: argparse.Namespace, device: torch.device) -> list[dict]:
    """All workloads on the current world; rows are returned on rank 0 (others return [])."""
    torch.manual_seed(0)
    timer = Timer(device, warmup=args.warmup, iters=args.iters, reps=args.reps)
    rows = []
    where = {"device": device.type}
    if device.type == "cuda":  # the machine a baseline is of (benchmarks/baselines.py)
        where["gpu"] = torch.cuda.get_device_name(device)
    else:
        where["cpu_cores"] = os.cpu_count()
    for name in args.workloads:
        for row in WORKLOADS[name](args, timer):
            row = {**row, **where}
            rows.append(row)
            if dist.get_rank() == 0:
                print(_progress_line(row), flush=True)
    return rows if dist.get_rank() == 0 else []


def _progress_line(row: dict) -> str:
    status = "ok" if row["ok"] else "FAILED"
    graph = f" (graph {row['graph_ms']:.3f} ms)" if row.get("graph_ms") else ""
    return (
        f"  world {row['world']} {row['variant']:<16} {row['mesh']:<7} {row['shape']:<22} "
        f"{row['median_ms']:9.3f} ms{graph}  err {row['max_err']:.2e} (1-device {row['ref_err']:.2e}) {status}"
    )


def _spawned_world(args: argparse.Namespace) -> list[dict]:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // dist.get_world_size()))
    return run_world(args, torch.device("cpu"))


def shape_key(shape: str) -> tuple:
    """Sort key for shape labels: numbers compare as numbers (``S509`` before ``S2048``)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", shape) if part)


def smoke_note(rows: list[dict]) -> str | None:
    """The caveat for rows timed on CPU processes (``None`` if there are none): not speed measurements."""
    cpu = [r for r in rows if r.get("device") == "cpu"]
    if not cpu:
        return None
    procs = max(r["world"] for r in cpu)
    cores = max((r.get("cpu_cores") or 0 for r in cpu), default=0) or "?"
    return (
        f"CPU smoke test: timings of up to {procs} processes sharing {cores} CPU cores are not speed measurements; "
        "the speedup columns only show that every world runs and agrees with one device"
    )


def write_report(rows: list[dict], out: Path) -> str:
    """Speedups over world 1, the table, CSV/JSON and the plot. Returns the table text.

    Rows sort by workload, shape (numerically), world and time; rows from CPU processes get the
    smoke-test caveat (``smoke_note``) above the table and on the plot."""
    singles = {(r["workload"], r["shape"]): r for r in rows if r["world"] == 1 and r["variant"] == "single"}
    for r in rows:
        one = singles.get((r["workload"], r["shape"]))
        r["speedup"] = round(one["median_ms"] / r["median_ms"], 3) if one else None
        graph_ms = r.get("graph_ms")
        r["graph_speedup"] = round(one["graph_ms"] / graph_ms, 3) if one and graph_ms and one.get("graph_ms") else None
    rows.sort(key=lambda r: (r["workload"], shape_key(r["shape"]), r["world"], r["median_ms"]))
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(rows, indent=1))
    with open(out / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
    header = (
        f"{'workload':<10} {'shape':<24} {'world':>5} {'variant':<16} {'mesh':<7} {'backend':<10} "
        f"{'median ms':>10} {'speedup':>8} {'graph ms':>9} {'speedup':>8} {'max err':>9} {'1-dev err':>9} ok"
    )
    note = smoke_note(rows)
    lines = ([note, ""] if note else []) + [header, "-" * len(header)]
    for r in rows:
        speed = f"{r['speedup']:.2f}" if r["speedup"] else "-"
        graph = f"{r['graph_ms']:.3f}" if r.get("graph_ms") else "-"
        graph_speed = f"{r['graph_speedup']:.2f}" if r["graph_speedup"] else "-"
        lines.append(
            f"{r['workload']:<10} {r['shape']:<24} {r['world']:>5} {r['variant']:<16} {r['mesh']:<7} "
            f"{r['backend']:<10} {r['median_ms']:>10.3f} {speed:>8} {graph:>9} {graph_speed:>8} "
            f"{r['max_err']:>9.2e} {r['ref_err']:>9.2e} {'yes' if r['ok'] else 'NO'}"
        )
    table = "\n".join(lines)
    (out / "sweep.txt").write_text(table + "\n")
    _plot(rows, out / "speedup.png", note)
    return table


def _plot(rows: list[dict], path: Path, note: str | None = None) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install -e .[bench])")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    worlds = sorted({r["world"] for r in rows})
    for key, style, what in (("speedup", "-", "eager"), ("graph_speedup", "--", "CUDA graph")):
        series: dict[str, dict[int, float]] = {}
        for r in rows:
            if (
                r.get(key) is None
                or r.get("baseline")
                or r["variant"] == "allgather_kv"
                or r["variant"].startswith("single ")
            ):
                continue
            best = series.setdefault(f"{r['workload']} {r['shape']}", {})
            best[r["world"]] = max(best.get(r["world"], 0.0), r[key])
        for i, (label, pts) in enumerate(sorted(series.items(), key=lambda item: shape_key(item[0]))):
            xs = sorted(pts)
            ax.plot(xs, [pts[x] for x in xs], style, color=f"C{i}", marker="o", label=f"{label}, best mesh, {what}")
    if not note:  # CPU processes sharing cores have no linear scaling to compare with
        ax.plot(worlds, worlds, "k:", lw=0.8, label="linear")
    ax.set_xlabel("processes on a CPU" if note else "devices")
    ax.set_ylabel("time ratio over 1 process (not a speed-up)" if note else "speedup over 1 device")
    if note:
        ax.set_title(note.split("; ")[0].replace(" are not", "\nare not"), fontsize=9)
    ax.set_xticks(worlds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


VARIANTS = ("ulysses", "ring", "usp", "allgather_kv", "peer")
DTYPES = ("float32", "bfloat16", "float16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The sweep's options; a bad value stops here with one line and exit status 2 (before any process)."""
    p = OneLineParser(
        prog=Path(__file__).name, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    positive, at_least_0 = int_at_least(1), int_at_least(0)
    p.add_argument(
        "--workloads", type=name_list(WORKLOADS), default=["attention"], help="comma-separated: " + ", ".join(WORKLOADS)
    )
    p.add_argument(
        "--worlds", type=int_list(), default=[1, 2, 4], help="CPU mode: world sizes to spawn (default 1,2,4)"
    )
    p.add_argument(
        "--seq",
        type=int_list(),
        default=None,
        help="global sequence lengths (default CPU 509,512,2048; GPU 4481,4608,16896)",
    )
    p.add_argument("--heads", type=positive, default=None, help="heads (default CPU 8; GPU 24)")
    p.add_argument("--head-dim", type=positive, default=None, help="head dim (default CPU 64; GPU 128)")
    p.add_argument("--batch", type=positive, default=1)
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default CPU float32; GPU bfloat16")
    p.add_argument("--backend", choices=("auto", *BACKEND_NAMES), default="auto")
    p.add_argument(
        "--variants",
        type=name_list(VARIANTS),
        default=list(VARIANTS),
        help="attention variants; peer: Ulysses / USP through a PeerExchange (GPUs only)",
    )
    p.add_argument(
        "--ulysses-backends", type=name_list(BACKEND_NAMES), default=[], help="also time ulysses with these kernels"
    )
    p.add_argument(
        "--flux-sizes",
        type=int_list(multiple_of=16),
        default=None,
        help="flux: image sizes in pixels, multiples of 16 (default CPU 112,128; GPU 1024,2048)",
    )
    p.add_argument("--flux-config", choices=("dev", "tiny"), default=None, help="flux: default CPU tiny; GPU dev")
    p.add_argument("--flux-reps", type=positive, default=None, help="flux: timed forwards (default CPU 3; GPU 5)")
    p.add_argument("--flux-warmup", type=at_least_0, default=1, help="flux: untimed forwards after the checked one")
    p.add_argument(
        "--flux-compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="flux: also time regional torch.compile (plain and ours on world 1, ours on the Ulysses mesh)",
    )
    p.add_argument(
        "--flux-baselines",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="flux, GPUs: also time diffusers' own context parallelism (ulysses and ring)",
    )
    p.add_argument(
        "--vae-sizes",
        type=int_list(multiple_of=8),
        default=None,
        help="vae: image sizes in pixels, multiples of 8 (default CPU 64,96; GPU 2048,4096,8192)",
    )
    p.add_argument("--vae-config", choices=("flux", "tiny"), default=None, help="vae: default CPU tiny; GPU flux")
    p.add_argument(
        "--vae-tile-rows", type=positive, default=None, help="vae: slab rows of the tiled rows (CPU 8; GPU 256)"
    )
    p.add_argument("--vae-reps", type=positive, default=None, help="vae: timed decodes (default CPU 2; GPU 3)")
    p.add_argument(
        "--vae-whole-bands",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="vae: on several ranks also time whole bands (no slabs); --no-vae-whole-bands: slabs only",
    )
    p.add_argument("--vae-warmup", type=at_least_0, default=0, help="vae: untimed decodes after the checked one")
    p.add_argument(
        "--vae-single-max", type=positive, default=None, help="vae: largest size the plain decode runs at (GPU 4096)"
    )
    p.add_argument(
        "--vae-ref-max", type=positive, default=None, help="vae: largest size with a float32 reference (GPU 4096)"
    )
    p.add_argument("--stdit-config", choices=("xl", "tiny"), default=None, help="stdit: default CPU tiny; GPU xl")
    p.add_argument(
        "--stdit-latent",
        type=int_list(length=3),
        default=None,
        help="stdit: latent T,H,W (default CPU 4,9,7; GPU 30,90,160 = 720p 4 s)",
    )
    p.add_argument(
        "--stdit-compile",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stdit: also time the blocks compiled (plain on world 1, USP on larger worlds)",
    )
    p.add_argument("--stdit-reps", type=positive, default=None, help="stdit: timed forwards (default CPU 2; GPU 3)")
    p.add_argument("--warmup", type=at_least_0, default=None)
    p.add_argument("--iters", type=positive, default=None)
    p.add_argument("--reps", type=positive, default=None)
    p.add_argument("--out", default="results", help="folder for sweep.json / .csv / .txt / speedup.png")
    p.add_argument("--report", default=None, help="only merge the world_*.json files in this folder")
    p.add_argument(
        "--check",
        default=None,
        help="after the report: compare with this baselines file (benchmarks/baselines.json); exit 1 on a "
        "regression, a parity failure or a listed figure not measured",
    )
    args = p.parse_args(argv)
    if not args.workloads:
        p.error("argument --workloads: expected at least one workload")
    if args.check is not None:
        try:
            load_baselines(args.check)
        except (OSError, ValueError, KeyError, TypeError) as e:
            p.error(f"argument --check: {args.check} is not a baselines file: {e}")
    return args


def _apply_defaults(args: argparse.Namespace, gpu: bool) -> None:
    defaults = {
        "seq": [4481, 4608, 16896] if gpu else [509, 512, 2048],  # 4481: FLUX at 1008² (3969 + 512)
        "heads": 24 if gpu else 8,
        "head_dim": 128 if gpu else 64,
        "dtype": "bfloat16" if gpu else "float32",
        "warmup": 5 if gpu else 2,
        "iters": 20 if gpu else 3,
        "reps": 10 if gpu else 5,
        "flux_sizes": [1024, 2048] if gpu else [112, 128],
        "flux_config": "dev" if gpu else "tiny",
        "flux_reps": 5 if gpu else 3,
        "vae_sizes": [2048, 4096, 8192] if gpu else [64, 96],
        "vae_config": "flux" if gpu else "tiny",
        "vae_tile_rows": 256 if gpu else 8,
        "vae_reps": 3 if gpu else 2,
        "vae_single_max": 4096 if gpu else 10**6,
        "vae_ref_max": 4096 if gpu else 10**6,
        "stdit_config": "xl" if gpu else "tiny",
        "stdit_latent": [30, 90, 160] if gpu else [4, 9, 7],
        "stdit_reps": 3 if gpu else 2,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.dtype_t = getattr(torch, args.dtype)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    if args.report:
        folder = Path(args.report)
        rows = [r for f in sorted(folder.glob("world_*.json")) for r in json.loads(f.read_text())]
        if not rows:
            raise SystemExit(f"sweep --report: no rows in {folder}/world_*.json (run the torchrun sweeps first)")
        print(write_report(rows, folder))
        _check(rows, args.check)
        return
    if "WORLD_SIZE" in os.environ:  # under torchrun: this world only, results appended per world
        ctx = init_distributed()
        _apply_defaults(args, gpu=ctx.device.type == "cuda")
        if ctx.rank == 0:
            print(f"sweep: world {ctx.world_size} on {ctx.device.type}, seq {args.seq}, {args.dtype}", flush=True)
        rows = run_world(args, ctx.device)
        if ctx.rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / f"world_{ctx.world_size}.json").write_text(json.dumps(rows, indent=1))
        dist.destroy_process_group()
        return
    _apply_defaults(args, gpu=False)
    print(
        f"sweep: CPU smoke test on {os.cpu_count()} cores: it checks every result against one device; "
        "its timings are not speed measurements",
        flush=True,
    )
    rows = []
    for world in args.worlds:
        print(f"sweep: spawning {world} CPU process(es) (gloo), seq {args.seq}, {args.dtype}", flush=True)
        rows += spawn(_spawned_world, world, args, backend="gloo", timeout_s=1800)[0]
    print(write_report(rows, out))
    print(f"\nwrote {out}/sweep.json, sweep.csv, sweep.txt, speedup.png")
    _check(rows, args.check)


def _check(rows: list[dict], path: str | None) -> None:
    """``--check``: the baselines of the rows' machines (``benchmarks/baselines.py``); exit 1 on a failure."""
    if path is None:
        return
    failures, notes = check_baselines(rows, load_baselines(path))
    print(f"\nbaselines ({path}):")
    for line in notes + failures:
        print(f"  {line}")
    if failures:
        raise SystemExit(f"sweep --check: {len(failures)} of the baselines failed")


if __name__ == "__main__":
    main()


__all__ = ["WORKLOADS", "ParallelMesh", "Timer", "meshes_for", "run_world", "write_report"]
