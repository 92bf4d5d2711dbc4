"""Serving benchmark (``xdit bench``): throughput and latency of an OpenAI-compatible image or video server.

It speaks only HTTP, so it measures any server with the OpenAI image or video API (ours, or a peer's such
as SGLang-diffusion) the same way::

    xdit bench --port 30000 --num-prompts 32 --concurrency-sweep 1,2,4,8 --plot latency.png --output-file bench.json

A run sends ``--num-prompts`` requests (after ``--warmup-requests`` untimed ones) and reports

* ``duration_s``: first submit to last completion; ``throughput_images_per_s`` (images or videos received
  per second of it) and ``throughput_requests_per_s`` (successful requests per second);
* latency (send to last byte, successful requests only): mean, p50, p90, p99 and max, in seconds;
* failures: HTTP errors (status and the OpenAI ``error.message``), connection errors and timeouts, counted
  per distinct message. The exit code is 0 when no request of any run failed, 1 otherwise, 2 when the
  server never became healthy or the prompt file is unusable.

An image request is ``POST /v1/images/generations`` with ``response_format=b64_json``; it succeeds when
``data`` holds ``n`` decodable base64 images. A video request is ``POST /v1/videos``, then ``GET
/v1/videos/{id}`` every ``--poll-interval`` seconds until ``completed`` (or ``failed``), then ``GET
/v1/videos/{id}/content``; its latency runs from submit to the content received.

``--max-concurrency`` and ``--request-rate`` mean what they mean in SGLang's ``bench_serving``: requests
arrive at ``--request-rate`` per second (Poisson arrivals, exponential gaps; ``inf``, the default, sends all at
t=0), and at most ``--max-concurrency`` of them are in flight; an arrival beyond that waits on the client,
and its latency starts when it is sent. ``--concurrency-sweep 1,2,4`` repeats the whole benchmark once per
value (as ``--max-concurrency``) and ``--plot`` draws p50 and p99 latency against throughput over the points.
Unlike ``bench_serving`` there are no tokens: throughput is counted in images (or videos) and requests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import json
import math
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

DEFAULT_PROMPTS = [
    "A lighthouse on a rocky coast at dusk, waves crashing, oil painting",
    "A red fox curled up asleep in fresh snow, soft morning light",
    "A futuristic city skyline at night with neon signs reflected in rain puddles",
    "A bowl of ramen with a soft-boiled egg, steam rising, studio photograph",
    "An astronaut riding a horse across a desert, cinematic wide shot",
    "A watercolor map of an imaginary island with mountains and rivers",
    "Close-up of a hummingbird drinking from a purple flower, shallow depth of field",
    "A cozy library with tall wooden shelves and a fireplace, warm lighting",
    "A cyberpunk street market crowded with vendors and floating drones",
    "A minimalist poster of a mountain range in pastel colors",
    "An old sailing ship in a storm, dramatic clouds, lightning",
    "A golden retriever puppy playing with a ball in a sunny garden",
    "A medieval castle on a hill surrounded by autumn forest, aerial view",
    "A still life of lemons and a glass carafe on a linen tablecloth",
    "A coral reef teeming with colorful fish, underwater photograph",
    "A steampunk robot reading a newspaper in a Victorian cafe",
    "Northern lights over a frozen lake with a lone cabin",
    "A pencil sketch of a busy train station in the 1920s",
    "A bowl of fruit made entirely of glass, macro photography",
    "A snowy mountain village at night with glowing windows, isometric 3D render",
]


# ---------------------------------------------------------------- pure helpers


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100) of ``values``, by linear interpolation (numpy's default 'linear')."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Start offsets (seconds after t=0, cumulative) of ``n`` requests arriving at ``rate`` per second.

    The first arrives at 0, the gaps are exponential with mean ``1 / rate`` (a Poisson process), drawn from
    ``random.Random(seed)``. An infinite rate sends everything at t=0.
    """
    if math.isinf(rate):
        return [0.0] * n
    rng = random.Random(seed)
    offsets, t = [], 0.0
    for _ in range(n):
        offsets.append(t)
        t += rng.expovariate(rate)
    return offsets


def summarize(
    latencies: Sequence[float],
    failures: Sequence[str],
    images: int,
    duration: float,
    settings: dict[str, Any],
) -> dict[str, Any]:
    """One run's metrics: ``latencies`` of the successful requests, one message per failed request, the
    images (or videos, when ``settings["task"] == "video"``) received, the wall time; ``settings`` is copied in.
    Latency statistics are ``None`` when no request succeeded."""
    unit = _unit(settings.get("task", "image"))
    rate = (lambda x: x / duration) if duration > 0 else (lambda x: 0.0)
    stats: dict[str, float | None] = dict.fromkeys(("mean", "p50", "p90", "p99", "max"))
    if latencies:
        stats = {"mean": sum(latencies) / len(latencies), **{f"p{q}": percentile(latencies, q) for q in (50, 90, 99)}}
        stats["max"] = max(latencies)
    errors = [{"message": m, "count": c} for m, c in Counter(failures).most_common(10)]
    return {
        **settings,
        "duration_s": duration,
        "completed": len(latencies),
        "failed": len(failures),
        unit: images,
        f"throughput_{unit}_per_s": rate(images),
        "throughput_requests_per_s": rate(len(latencies)),
        **{f"latency_{name}_s": value for name, value in stats.items()},
        "errors": errors,
    }


def _unit(task: str) -> str:
    return "videos" if task == "video" else "images"


# ---------------------------------------------------------------- arguments


def _number(convert: Callable[[str], Any], low: float, inclusive: bool = False) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)``, above ``low`` (or equal, when ``inclusive``)."""

    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            what = "an integer" if convert is int else "a number"
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not (value >= low if inclusive else value > low):  # rejects nan too
            raise argparse.ArgumentTypeError(f"{text} must be {'>=' if inclusive else '>'} {low:g}")
        return value

    return parse


_positive_int = _number(int, 0)
_positive_float = _number(float, 0)


def _size(text: str) -> str:
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not match or int(match[1]) < 1 or int(match[2]) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT with positive integers (e.g. 1024x1024)")
    return f"{int(match[1])}x{int(match[2])}"


def _int_list(text: str) -> list[int]:
    values = [_positive_int(part.strip()) for part in text.split(",") if part.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} names no value (e.g. 1,2,4,8)")
    return values


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the benchmark's options to ``parser`` (``run_bench`` reads them)."""
    add = parser.add_argument_group("server").add_argument
    add("--base-url", help="server URL, e.g. http://host:30000 (default: from --host and --port)")
    add("--host", default="127.0.0.1")
    add("--port", type=int, default=30000)
    add("--wait-for-server", type=_number(float, 0, True), default=60.0, help="seconds to wait for GET /health (60)")
    add = parser.add_argument_group("load").add_argument
    add("--task", choices=["image", "video"], default="image")
    add("--num-prompts", type=_positive_int, default=10, help="timed requests per run (default 10)")
    add("--max-concurrency", type=_positive_int, help="most requests in flight at once (default: unlimited)")
    add("--request-rate", type=_positive_float, default=math.inf, help="Poisson arrivals/s (default inf: all at t=0)")
    add("--concurrency-sweep", type=_int_list, metavar="C1,C2,...", help="one run per max concurrency, e.g. 1,2,4,8")
    add("--warmup-requests", type=_number(int, 0, True), default=1, help="untimed requests first (default 1)")
    add("--timeout", type=_positive_float, default=600.0, help="seconds per request (default 600)")
    add("--poll-interval", type=_positive_float, default=1.0, help="seconds between video status polls (default 1)")
    add = parser.add_argument_group("request fields (those not given are left to the server)").add_argument
    add("--model")
    add("--size", type=_size, help="WIDTHxHEIGHT")
    add("--num-inference-steps", type=_positive_int)
    add("--guidance-scale", type=float)
    add("--seconds", type=_positive_float, help="video length (video task)")
    add("--num-frames", type=_positive_int, help="video frames (video task)")
    add("--seed", type=int, help="request i gets seed+i (not sent when absent); seeds the arrivals too (default 0)")
    add("--dataset-path", help="prompts: a text file, one per line, or a JSON list of strings (default: built in)")
    add = parser.add_argument_group("output").add_argument
    add("--output-file", help="write the results here as JSON")
    add("--plot", help="write a PNG of p50 and p99 latency against throughput here")
    add("--disable-tqdm", action="store_true", help="no progress bar")
    parser.epilog = parser.epilog or "Exit code: 0 when no request failed, 1 when any did, 2 when it could not start."


def load_prompts(path: str | None) -> list[str]:
    """The prompts of ``path`` (JSON list of strings, or one per line), or the built-in list."""
    if path is None:
        return list(DEFAULT_PROMPTS)
    text = Path(path).read_text()
    if path.endswith(".json") or text.lstrip().startswith("["):
        prompts = json.loads(text)
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{path}: expected a JSON list of strings")
    else:
        prompts = text.splitlines()
    prompts = [p.strip() for p in prompts if p.strip()]
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


# ---------------------------------------------------------------- requests


@dataclass
class _Result:
    start: float
    end: float
    outputs: int = 0
    error: str | None = None


class _Failed(Exception):
    """A request that did not succeed, with its message."""


def _http_error(response: httpx.Response) -> _Failed:
    message = ""
    with contextlib.suppress(ValueError, AttributeError, KeyError, TypeError):
        message = response.json()["error"]["message"]
    return _Failed(f"HTTP {response.status_code}: {message}" if message else f"HTTP {response.status_code}")


def _json(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:
        raise _http_error(response)
    try:
        body = response.json()
    except ValueError:
        raise _Failed("response is not JSON") from None
    if not isinstance(body, dict):
        raise _Failed("response is not a JSON object")
    return body


def _payload(args: argparse.Namespace, prompt: str, seed: int | None) -> dict[str, Any]:
    fields: dict[str, Any] = {"prompt": prompt, "model": args.model, "size": args.size, "seed": seed}
    fields.update(num_inference_steps=args.num_inference_steps, guidance_scale=args.guidance_scale)
    if args.task == "image":
        fields.update(n=1, response_format="b64_json")
    else:  # the OpenAI API's seconds is a string ("4"); a server with an int field accepts that too
        fields.update(seconds=None if args.seconds is None else f"{args.seconds:g}", num_frames=args.num_frames)
    return {key: value for key, value in fields.items() if value is not None}


async def _image(client: httpx.AsyncClient, base: str, payload: dict[str, Any], _poll: float) -> int:
    body = _json(await client.post(f"{base}/v1/images/generations", json=payload))
    data = body.get("data")
    if not isinstance(data, list) or len(data) != payload["n"]:
        raise _Failed(f"expected {payload['n']} images in 'data', got {len(data) if isinstance(data, list) else 0}")
    for item in data:
        encoded = item.get("b64_json") if isinstance(item, dict) else None
        if not encoded:
            raise _Failed("an image has no b64_json")
        try:
            base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise _Failed("b64_json is not base64") from None
    return len(data)


async def _video(client: httpx.AsyncClient, base: str, payload: dict[str, Any], poll: float) -> int:
    job = _json(await client.post(f"{base}/v1/videos", json=payload))
    if "id" not in job:
        raise _Failed("video response has no id")
    while job.get("status") not in ("completed", "failed"):
        await asyncio.sleep(poll)
        job = _json(await client.get(f"{base}/v1/videos/{job['id']}"))
    if job["status"] == "failed":
        error = job.get("error")
        raise _Failed(f"video failed: {error.get('message') if isinstance(error, dict) else error or 'no reason'}")
    content = await client.get(f"{base}/v1/videos/{job['id']}/content")
    if content.status_code != 200:
        raise _http_error(content)
    if not content.content:
        raise _Failed("video content is empty")
    return 1


async def _send(client: httpx.AsyncClient, args: argparse.Namespace, base: str, payload: dict[str, Any]) -> _Result:
    """One request, timed; every failure (HTTP, connection, timeout, malformed reply) becomes a message."""
    call = _video if args.task == "video" else _image
    start = time.perf_counter()
    try:
        outputs = await asyncio.wait_for(call(client, base, payload, args.poll_interval), args.timeout)
        return _Result(start, time.perf_counter(), outputs)
    except _Failed as error:
        message = str(error)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        message = f"timeout after {args.timeout:g} s"
    except httpx.HTTPError as error:
        message = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
    except Exception as error:  # a malformed reply must not end the benchmark
        message = f"{type(error).__name__}: {error}"
    return _Result(start, time.perf_counter(), error=message[:200])


# ---------------------------------------------------------------- runs


def _base_url(args: argparse.Namespace) -> str:
    return (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")


async def _wait_for_server(base: str, seconds: float) -> str | None:
    """None once ``GET /health`` answers 200, else why not after ``seconds``."""
    deadline, last = time.monotonic() + seconds, "no answer"
    async with httpx.AsyncClient(timeout=5.0) as client:
        while True:
            try:
                response = await client.get(f"{base}/health")
                if response.status_code == 200:
                    return None
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as error:
                last = type(error).__name__
            if time.monotonic() >= deadline:
                return last
            await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))


async def _run(args: argparse.Namespace, base: str, prompts: list[str], concurrency: int | None) -> dict[str, Any]:
    n = args.num_prompts
    connections = concurrency or n
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    seed0 = 0 if args.seed is None else args.seed
    seed_of = (lambda i: None) if args.seed is None else (lambda i: args.seed + i)
    async with httpx.AsyncClient(timeout=args.timeout, limits=limits) as client:
        for i in range(args.warmup_requests):
            result = await _send(client, args, base, _payload(args, prompts[i % len(prompts)], seed_of(i)))
            if result.error:
                print(f"warning: warm-up request failed: {result.error}", file=sys.stderr)
        gate = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()
        bar = tqdm(total=n, disable=args.disable_tqdm, desc=f"concurrency {concurrency or 'unlimited'}", unit="req")
        t0 = time.perf_counter()

        async def one(i: int, offset: float) -> _Result:
            await asyncio.sleep(max(0.0, t0 + offset - time.perf_counter()))
            async with gate:
                result = await _send(client, args, base, _payload(args, prompts[i % len(prompts)], seed_of(i)))
            bar.update(1)
            return result

        offsets = poisson_arrivals(n, args.request_rate, seed0)
        results = await asyncio.gather(*(one(i, offset) for i, offset in enumerate(offsets)))
        bar.close()
    ok = [r for r in results if r.error is None]
    settings = {
        "task": args.task,
        "base_url": base,
        "model": args.model,
        "size": args.size,
        "num_prompts": n,
        "concurrency": concurrency,
        "request_rate": None if math.isinf(args.request_rate) else args.request_rate,
        "num_inference_steps": args.num_inference_steps,
    }
    return summarize(
        [r.end - r.start for r in ok],
        [r.error for r in results if r.error is not None],
        sum(r.outputs for r in ok),
        max(r.end for r in results) - min(r.start for r in results),
        settings,
    )


def _table(runs: list[dict[str, Any]], task: str) -> str:
    unit = _unit(task)
    head = ["concurrency", "rate/s", "ok", "failed", "duration s", f"{unit}/s", "req/s"]
    head += ["mean s", "p50 s", "p90 s", "p99 s", "max s"]
    rows = [head]
    numbers = ["duration_s", f"throughput_{unit}_per_s", "throughput_requests_per_s"]
    numbers += [f"latency_{name}_s" for name in ("mean", "p50", "p90", "p99", "max")]
    for run in runs:
        rate = "inf" if run["request_rate"] is None else f"{run['request_rate']:g}"
        rows.append([str(run["concurrency"] or "unlimited"), rate, str(run["completed"]), str(run["failed"])])
        rows[-1] += ["-" if run[key] is None else f"{run[key]:.3f}" for key in numbers]
    widths = [max(len(row[c]) for row in rows) for c in range(len(head))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    for run in runs:
        for error in run["errors"]:
            lines.append(f"concurrency {run['concurrency'] or 'unlimited'}: {error['count']} x {error['message']}")
    return "\n".join(lines)


def _plot(runs: list[dict[str, Any]], task: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = _unit(task)
    points = [r for r in runs if r["latency_p50_s"] is not None]
    x = [r[f"throughput_{unit}_per_s"] for r in points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, [r["latency_p50_s"] for r in points], "o-", label="p50")
    ax.plot(x, [r["latency_p99_s"] for r in points], "s--", label="p99")
    for r, xi in zip(points, x, strict=True):
        label = f"c={r['concurrency'] or 'all'}"
        ax.annotate(label, (xi, r["latency_p50_s"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    ax.set_xlabel(f"throughput ({unit}/s)")
    ax.set_ylabel("latency (s)")
    ax.set_title(f"{task} serving: latency against throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark ``args`` describe (from ``add_bench_arguments``); print the table, write the JSON and
    plot when asked. Returns 0 when no request failed, 1 when any did, 2 when it could not start."""
    if args.concurrency_sweep and args.max_concurrency is not None:
        print("error: give --max-concurrency or --concurrency-sweep, not both", file=sys.stderr)
        return 2
    try:
        prompts = load_prompts(args.dataset_path)
    except (OSError, ValueError) as error:
        print(f"error: --dataset-path: {error}", file=sys.stderr)
        return 2
    base = _base_url(args)
    problem = asyncio.run(_wait_for_server(base, args.wait_for_server))
    if problem is not None:
        print(f"error: {base}/health did not answer 200 within {args.wait_for_server:g} s ({problem})", file=sys.stderr)
        return 2
    runs = [asyncio.run(_run(args, base, prompts, c)) for c in (args.concurrency_sweep or [args.max_concurrency])]
    print(_table(runs, args.task))
    if args.output_file:
        Path(args.output_file).write_text(json.dumps({"runs": runs, "created": int(time.time())}, indent=2) + "\n")
    if args.plot:
        _plot(runs, args.task, args.plot)
    return 0 if all(run["failed"] == 0 for run in runs) else 1
