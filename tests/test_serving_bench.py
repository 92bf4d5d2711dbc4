"""serving/bench.py: the pure helpers (percentiles as numpy computes them, Poisson arrivals, the run summary),
argument checks, and whole runs against a small fake OpenAI-compatible server (FastAPI under uvicorn in a
thread on a free loopback port): a concurrency sweep writes its JSON and plot, failed requests are counted
with the server's error message and set the exit code, the video task polls to completion, and
``--max-concurrency`` bounds the requests the server sees in flight."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import random
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from serving.bench import add_bench_arguments, percentile, poisson_arrivals, run_bench, summarize

PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


# ---------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("n", [1, 2, 3, 10, 101])
def test_percentile_matches_numpy(n: int) -> None:
    rng = random.Random(n)
    values = [rng.uniform(-5, 50) for _ in range(n)]
    for q in (0, 1, 25, 50, 90, 99, 99.9, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-12, abs=1e-12)
    with pytest.raises(ValueError):
        percentile([], 50)


def test_poisson_arrivals() -> None:
    assert poisson_arrivals(5, math.inf, seed=3) == [0.0] * 5
    rate, n = 4.0, 20000
    offsets = poisson_arrivals(n, rate, seed=7)
    gaps = np.diff(offsets)
    assert offsets[0] == 0.0 and len(offsets) == n and (gaps >= 0).all()
    assert gaps.mean() == pytest.approx(1 / rate, rel=0.05)
    assert gaps.std() == pytest.approx(1 / rate, rel=0.05)  # exponential: std == mean
    assert poisson_arrivals(50, rate, seed=7) == offsets[:50]  # seeded, reproducible
    assert poisson_arrivals(50, rate, seed=8) != offsets[:50]


def test_summarize() -> None:
    settings = {"task": "image", "concurrency": 2, "request_rate": None, "num_prompts": 6}
    out = summarize([1.0, 2.0, 3.0, 4.0], ["HTTP 500: boom"] * 2, images=4, duration=2.0, settings=settings)
    assert out["concurrency"] == 2 and out["num_prompts"] == 6
    assert (out["completed"], out["failed"], out["images"]) == (4, 2, 4)
    assert out["throughput_images_per_s"] == 2.0 and out["throughput_requests_per_s"] == 2.0
    assert out["latency_mean_s"] == 2.5 and out["latency_p50_s"] == 2.5 and out["latency_max_s"] == 4.0
    assert out["latency_p90_s"] == pytest.approx(np.percentile([1, 2, 3, 4], 90))
    assert out["latency_p99_s"] == pytest.approx(np.percentile([1, 2, 3, 4], 99))
    assert out["errors"] == [{"message": "HTTP 500: boom", "count": 2}]
    none = summarize([], ["x"], images=0, duration=0.0, settings={"task": "video"})
    assert none["videos"] == 0 and none["throughput_videos_per_s"] == 0.0 and none["latency_p99_s"] is None
    json.dumps(none, allow_nan=False)


# ---------------------------------------------------------------- arguments


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)
    return parser.parse_args(argv)


def test_defaults() -> None:
    args = parse([])
    assert (args.host, args.port, args.base_url, args.task) == ("127.0.0.1", 30000, None, "image")
    assert (args.num_prompts, args.max_concurrency, args.request_rate, args.warmup_requests) == (10, None, math.inf, 1)
    assert (args.timeout, args.poll_interval, args.wait_for_server, args.seed) == (600.0, 1.0, 60.0, None)
    assert parse(["--concurrency-sweep", "1, 2,8", "--size", "512X768"]).concurrency_sweep == [1, 2, 8]
    assert parse(["--size", "512X768"]).size == "512x768"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-prompts", "0"], "argument --num-prompts: 0 must be > 0"),
        (["--max-concurrency", "two"], "argument --max-concurrency: 'two' is not an integer"),
        (["--request-rate", "0"], "argument --request-rate: 0 must be > 0"),
        (["--request-rate", "nan"], "argument --request-rate: nan must be > 0"),
        (["--size", "1024"], "argument --size: '1024' is not WIDTHxHEIGHT"),
        (["--size", "0x512"], "argument --size: '0x512' is not WIDTHxHEIGHT"),
        (["--concurrency-sweep", "1,0"], "argument --concurrency-sweep: 0 must be > 0"),
        (["--concurrency-sweep", ","], "argument --concurrency-sweep: ',' names no value"),
        (["--warmup-requests", "-1"], "argument --warmup-requests: -1 must be >= 0"),
        (["--task", "audio"], "argument --task: invalid choice: 'audio'"),
    ],
)
def test_bad_arguments_stop_argparse(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


# ---------------------------------------------------------------- a fake OpenAI-compatible server


class FakeServer:
    """Images and videos after a short sleep; a prompt with FAIL answers 500 with the OpenAI error body, one with
    SLOW sleeps 2 s. It records the most requests it held at once."""

    def __init__(self) -> None:
        self.in_flight = self.max_in_flight = self.requests = 0
        self.bodies: list[dict] = []
        self.videos: dict[str, float] = {}  # id -> when it completes
        self.app = FastAPI()
        app = self.app

        @app.get("/health")
        async def health() -> dict:
            return {"status": "ok"}

        @app.post("/v1/images/generations")
        async def images(request: Request) -> Response:
            body = await request.json()
            with self.held():
                self.bodies.append(body)
                await asyncio.sleep(2.0 if "SLOW" in body["prompt"] else 0.05)
                if "FAIL" in body["prompt"]:
                    error = {"message": "the model refused", "type": "server_error", "param": None, "code": None}
                    return JSONResponse({"error": error}, status_code=500)
                return JSONResponse({"created": int(time.time()), "data": [{"b64_json": PNG_1X1}] * body.get("n", 1)})

        @app.post("/v1/videos")
        async def submit(request: Request) -> dict:
            body = await request.json()
            self.bodies.append(body)
            video_id = f"video_{len(self.videos)}"
            self.videos[video_id] = time.monotonic() + 0.1
            return {"id": video_id, "object": "video", "status": "queued"}

        @app.get("/v1/videos/{video_id}")
        async def status(video_id: str) -> dict:
            done = time.monotonic() >= self.videos[video_id]
            return {"id": video_id, "object": "video", "status": "completed" if done else "in_progress"}

        @app.get("/v1/videos/{video_id}/content")
        async def content(video_id: str) -> Response:
            return Response(b"\x00\x00\x00\x18ftypmp42 fake video", media_type="video/mp4")

    def held(self):
        server = self

        class Held:
            def __enter__(self) -> None:
                server.in_flight += 1
                server.requests += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)

            def __exit__(self, *exc: object) -> None:
                server.in_flight -= 1

        return Held()

    def reset(self) -> None:
        self.in_flight = self.max_in_flight = self.requests = 0
        self.bodies.clear()


@pytest.fixture(scope="module")
def fake() -> tuple[FakeServer, str]:
    fake = FakeServer()
    server = uvicorn.Server(uvicorn.Config(fake.app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the fake server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def bench(base: str, *argv: str) -> argparse.Namespace:
    return parse(["--base-url", base, "--disable-tqdm", "--wait-for-server", "5", *argv])


# ---------------------------------------------------------------- whole runs


def test_sweep_writes_json_and_plot(fake, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    server, base = fake
    server.reset()
    out, plot = tmp_path / "bench.json", tmp_path / "latency.png"
    args = bench(base + "/", "--num-prompts", "4", "--concurrency-sweep", "1,2", "--output-file", str(out))
    args.plot, args.seed, args.num_inference_steps = str(plot), 5, 3
    assert run_bench(args) == 0
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(out.read_text())
    assert isinstance(result["created"], int) and [r["concurrency"] for r in result["runs"]] == [1, 2]
    for run in result["runs"]:
        assert (run["completed"], run["failed"], run["images"], run["errors"]) == (4, 0, 4, [])
        assert run["task"] == "image" and run["base_url"] == base and run["num_prompts"] == 4
        assert run["request_rate"] is None and run["throughput_images_per_s"] > 0
        assert 0.05 <= run["latency_p50_s"] <= run["latency_p99_s"] <= run["latency_max_s"] < run["duration_s"] + 1e-6
        assert run["throughput_requests_per_s"] == pytest.approx(4 / run["duration_s"])
    one, two = result["runs"]
    assert two["duration_s"] < one["duration_s"]  # two at once finish sooner
    assert server.requests == 2 * (1 + 4)  # one warm-up per run
    timed = server.bodies[1:5]
    assert [b["seed"] for b in timed] == [5, 6, 7, 8] and all(b["num_inference_steps"] == 3 for b in timed)
    assert all(b["n"] == 1 and b["response_format"] == "b64_json" and "size" not in b for b in timed)
    assert "guidance_scale" not in timed[0] and "model" not in timed[0]
    table = capsys.readouterr().out
    assert "concurrency" in table and "images/s" in table and "p99 s" in table


def test_failures_are_counted_and_set_the_exit_code(fake, tmp_path: Path) -> None:
    server, base = fake
    server.reset()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\nFAIL please\n\na dog\n")
    out = tmp_path / "bench.json"
    args = bench(base, "--num-prompts", "6", "--dataset-path", str(prompts), "--output-file", str(out))
    args.warmup_requests, args.model, args.size = 0, "fake-model", "64x32"
    assert run_bench(args) == 1
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["completed"], run["failed"], run["images"]) == (4, 2, 4)
    assert run["errors"] == [{"message": "HTTP 500: the model refused", "count": 2}]
    assert sorted(b["prompt"] for b in server.bodies) == ["FAIL please"] * 2 + ["a cat"] * 2 + ["a dog"] * 2
    assert all(b["model"] == "fake-model" and b["size"] == "64x32" and "seed" not in b for b in server.bodies)


def test_json_prompt_list_and_timeouts(fake, tmp_path: Path) -> None:
    server, base = fake
    server.reset()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(["SLOW one", "quick one"]))
    args = bench(base, "--num-prompts", "2", "--dataset-path", str(prompts), "--timeout", "0.3")
    args.warmup_requests, args.output_file = 0, str(tmp_path / "out.json")
    assert run_bench(args) == 1
    (run,) = json.loads(Path(args.output_file).read_text())["runs"]
    assert (run["completed"], run["failed"]) == (1, 1)
    assert run["errors"] == [{"message": "timeout after 0.3 s", "count": 1}]


def test_video_task_polls_until_completed(fake, tmp_path: Path) -> None:
    server, base = fake
    server.reset()
    out = tmp_path / "video.json"
    args = bench(base, "--task", "video", "--num-prompts", "3", "--poll-interval", "0.02", "--output-file", str(out))
    args.seconds, args.num_frames, args.plot = 2.0, None, str(tmp_path / "video.png")
    assert run_bench(args) == 0
    (run,) = json.loads(out.read_text())["runs"]
    assert (run["task"], run["completed"], run["failed"], run["videos"]) == ("video", 3, 0, 3)
    assert run["throughput_videos_per_s"] > 0 and run["latency_p50_s"] >= 0.1
    assert all(b["seconds"] == "2" and "n" not in b and "response_format" not in b for b in server.bodies)
    assert (tmp_path / "video.png").exists()


def test_max_concurrency_bounds_the_requests_in_flight(fake) -> None:
    server, base = fake
    server.reset()
    args = bench(base, "--num-prompts", "8", "--max-concurrency", "2", "--warmup-requests", "0")
    assert run_bench(args) == 0
    assert server.requests == 8 and server.max_in_flight == 2
    server.reset()
    assert run_bench(bench(base, "--num-prompts", "6", "--warmup-requests", "0")) == 0  # unlimited: all at once
    assert server.max_in_flight == 6


def test_request_rate_spaces_the_arrivals(fake) -> None:
    server, base = fake
    server.reset()
    args = bench(base, "--num-prompts", "5", "--request-rate", "20", "--seed", "1", "--warmup-requests", "0")
    start = time.perf_counter()
    assert run_bench(args) == 0
    assert time.perf_counter() - start >= poisson_arrivals(5, 20.0, seed=1)[-1]


def test_unreachable_server_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse(["--port", "9", "--wait-for-server", "0.2", "--disable-tqdm"])  # nothing listens on port 9
    assert run_bench(args) == 2
    err = capsys.readouterr().err
    assert "http://127.0.0.1:9/health did not answer 200 within 0.2 s" in err and "ConnectError" in err
    args = parse(["--dataset-path", str(tmp_path / "missing.txt")])
    assert run_bench(args) == 2 and "--dataset-path" in capsys.readouterr().err


def test_png_fixture_is_base64_png() -> None:
    assert base64.b64decode(PNG_1X1)[:8] == b"\x89PNG\r\n\x1a\n"
