"""The server against direct pipeline calls, in one process on one GPU: the overhead, batching, a concurrency sweep.

``python benchmarks/serving_bench.py --out DIR``: builds the FLUX.1-dev pipeline of
``flux_pipeline_model.py`` (T5-XXL, CLIP-L, the transformer, the VAE; random weights, bf16), wraps it as
``xdit serve flux`` does (``serving.served.build_flux``) and measures, side by side in this process:

* ``direct``: the parallel pipeline called directly, one image per call (PIL out, as the server gets it),
  ``--reps`` calls at ``--size``² and ``--batch-reps`` at ``--batch-size-px``², median seconds;
* ``overhead``: the same requests through HTTP (``serving.service.Service``, the code ``xdit serve`` runs,
  uvicorn in this process) measured by ``xdit bench`` in a subprocess at concurrency 1: its p50 latency
  over the direct median (target: at most 1.02);
* ``batching``: ``xdit bench`` at ``--batch-size-px``², concurrency 4, against the server with
  ``--max-batch-size 4`` and with 1 (one at a time, as every peer serves); their throughput over the
  direct serial throughput (target: batched at least 1.3×);
* ``sweep``: ``xdit bench --concurrency-sweep`` (``--sweep``) at ``--size``² against ``--max-batch-size 8``:
  p50 / p99 latency and throughput per level, and its plot.

``--parts`` picks which (every part rebuilds nothing: one pipeline serves them all). ``--tiny`` runs the tiny
random pipeline on the CPU (a smoke test of the script). Results: ``DIR/serving_bench.json``, the bench
JSON files and the sweep's plot.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the benchmark models beside this file
ROOT = Path(__file__).resolve().parent.parent
PARTS = ("overhead", "batching", "sweep")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--size", type=int, default=1024, help="overhead and sweep image side (default 1024)")
    p.add_argument("--batch-size-px", type=int, default=512, help="batching part image side (default 512)")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--reps", type=int, default=5, help="direct calls and concurrency-1 requests at --size")
    p.add_argument("--batch-reps", type=int, default=16, help="direct calls and requests of the batching part")
    p.add_argument("--png-levels", type=int, nargs="+", default=[0], help="overhead part: one server per PNG level")
    p.add_argument("--sweep", default="1,2,4,8")
    p.add_argument("--sweep-prompts", type=int, default=8, help="requests per sweep level")
    p.add_argument("--tiny", action="store_true", help="the tiny random pipeline on the CPU (smoke test)")
    p.add_argument("--out", default="results/serving")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    from serving.launch_checks import process_group
    from serving.served import build_flux
    from xdit_core import ParallelMesh

    with process_group() as ctx:
        mesh = ParallelMesh.build(ulysses=1, ring=1)
        control = dist.new_group(backend="gloo")
        if args.tiny:
            from models.testing import tiny_flux_pipeline

            pipe, multiple = tiny_flux_pipeline(seed=0), 4
        else:
            from flux_pipeline_model import build_flux_dev_pipeline

            pipe, multiple = build_flux_dev_pipeline(ctx.device), 16
        served = build_flux(mesh, ctx.device, model_path=None, multiple=multiple, max_batch_images=8, pipe=pipe)
        results: dict[str, Any] = {
            "machine": torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu",
            "torch": torch.__version__, "steps": args.steps,
            "model": "tiny" if args.tiny else "FLUX.1-dev (random, bf16)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        }  # fmt: skip
        direct = Direct(served, ctx.device, args.steps)
        for side in {args.size, args.batch_size_px}:
            direct.time(side, 1)  # warm-up (kernels chosen, caches filled)
        if "overhead" in args.parts:
            results["overhead"] = overhead(args, served, control, direct, out)
        if "batching" in args.parts:
            results["batching"] = batching(args, served, control, direct, out)
        if "sweep" in args.parts:
            results["sweep"] = sweep(args, served, control, out)
        (out / "serving_bench.json").write_text(json.dumps(results, indent=2))
        print(json.dumps(results, indent=2))


class Direct:
    """The pipeline called directly, as the server calls it (PIL images out), seconds per call."""

    def __init__(self, served: Any, device: torch.device, steps: int) -> None:
        self.served, self.device, self.steps = served, device, steps

    def time(self, side: int, reps: int) -> list[float]:
        times = []
        for i in range(reps):
            start = time.perf_counter()
            images = self.served.pipe(
                f"a photograph of a lighthouse on a cliff at dusk, number {i}", height=side, width=side,
                num_inference_steps=self.steps, guidance_scale=self.served.limits.default_guidance,
                max_sequence_length=self.served.max_sequence_length,
                generator=torch.Generator(self.device).manual_seed(i),
            ).images  # fmt: skip
            times.append(time.perf_counter() - start)  # PIL conversion has synchronised the device
            assert len(images) == 1
        return times


def serve_and_bench(
    served: Any, control: Any, max_batch: int, benches: list[list[str]], out: Path, png_level: int = 0
) -> list[dict]:
    """Serve ``served`` (``xdit serve``'s code, in this process) and run ``xdit bench`` once per argument list."""
    from serving.service import Service

    port = _free_port()
    service = Service(served, control, host="127.0.0.1", port=port, max_batch_images=max_batch, max_wait_s=0.01,
                      max_queue=256, log_level="warning", png_level=png_level)  # fmt: skip
    reports: list[dict] = []

    def client() -> None:
        try:
            for k, extra in enumerate(benches):
                path = out / f"bench_b{max_batch}_{len(list(out.glob('bench_*.json')))}_{k}.json"
                command = [sys.executable, "-m", "serving.cli", "bench", "--port", str(port), "--disable-tqdm",
                           "--wait-for-server", "120", "--output-file", str(path), *extra]  # fmt: skip
                done = subprocess.run(command, cwd=ROOT, env=os.environ.copy(), capture_output=True, text=True)
                print(done.stdout[-3000:], done.stderr[-2000:], flush=True)
                reports.append(json.loads(path.read_text()) if path.exists() else {"error": done.stderr[-2000:]})
            reports.append({"metrics": _scrape(port)})
        finally:
            service.drain("benchmark done")

    thread = threading.Thread(target=client)
    thread.start()
    code = service.run()
    thread.join()
    if code:
        raise RuntimeError("the server stopped on an engine failure")
    return reports


def overhead(args: argparse.Namespace, served: Any, control: Any, direct: Direct, out: Path) -> dict[str, Any]:
    size = f"{args.size}x{args.size}"
    times = direct.time(args.size, args.reps)
    direct_s = statistics.median(times)
    bench = ["--num-prompts", str(args.reps), "--max-concurrency", "1", "--size", size,
             "--num-inference-steps", str(args.steps), "--seed", "0"]  # fmt: skip
    servers = []
    for level in args.png_levels:
        reports = serve_and_bench(served, control, 8, [bench], out, png_level=level)
        run = reports[0]["runs"][0]
        servers.append({
            "png_level": level, "client": run, "server_side": reports[-1]["metrics"],
            "p50_over_direct": run["latency_p50_s"] / direct_s,
            "mean_over_direct": run["latency_mean_s"] / statistics.mean(times),
        })  # fmt: skip
    return {"size": size, "direct_s": times, "direct_median_s": direct_s, "servers": servers}


def batching(args: argparse.Namespace, served: Any, control: Any, direct: Direct, out: Path) -> dict[str, Any]:
    side, n = args.batch_size_px, args.batch_reps
    times = direct.time(side, n)
    serial = n / sum(times)  # images per second, one direct call after another
    bench = ["--num-prompts", str(n), "--max-concurrency", "4", "--size", f"{side}x{side}",
             "--num-inference-steps", str(args.steps), "--seed", "0", "--warmup-requests", "4"]  # fmt: skip
    batched = serve_and_bench(served, control, 4, [bench], out)[0]["runs"][0]
    one_at_a_time = serve_and_bench(served, control, 1, [bench], out)[0]["runs"][0]
    return {
        "size": f"{side}x{side}", "concurrency": 4, "direct_s": times, "direct_serial_images_per_s": serial,
        "server_batched": batched, "server_one_at_a_time": one_at_a_time,
        "batched_over_direct_serial": batched["throughput_images_per_s"] / serial,
        "batched_over_server_one_at_a_time": batched["throughput_images_per_s"]
        / one_at_a_time["throughput_images_per_s"],
    }  # fmt: skip


def sweep(args: argparse.Namespace, served: Any, control: Any, out: Path) -> dict[str, Any]:
    bench = ["--num-prompts", str(args.sweep_prompts), "--concurrency-sweep", args.sweep,
             "--size", f"{args.size}x{args.size}", "--num-inference-steps", str(args.steps), "--seed", "0",
             "--warmup-requests", "1", "--plot", str(out / "serving_sweep.png")]  # fmt: skip
    report = serve_and_bench(served, control, 8, [bench], out)[0]
    keys = ("concurrency", "throughput_images_per_s", "latency_p50_s", "latency_p99_s", "latency_mean_s", "failed")
    return {"size": f"{args.size}x{args.size}", "runs": [{k: r[k] for k in keys} for r in report["runs"]]}


def _scrape(port: int) -> dict[str, float]:
    """The server's own means: batch run, encode and request latency (arrival to answer), from /metrics."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if ("_sum" in name or "_count" in name) and not line.startswith("#"):
            values[name] = float(value)
    means = {}
    for key in ("xdit_batch_seconds", "xdit_encode_seconds", 'xdit_request_latency_seconds{endpoint="images"}'):
        base, _, label = key.partition("{")
        suffix = "{" + label if label else ""
        count = values.get(f"{base}_count{suffix}", 0)
        means[base + "_mean"] = values.get(f"{base}_sum{suffix}", 0) / count if count else None
    return means


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    main()
