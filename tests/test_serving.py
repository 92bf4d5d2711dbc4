"""The server as users run it: the ``xdit`` console script (one process) and ``torchrun`` (two gloo ranks), the
tiny random models on the CPU, a free loopback port; the official ``openai`` client and plain HTTP against it.

Images are compared with the stock diffusers pipeline's own output for the same seeds (the tiny FLUX of
``models.testing``, float32): at most one uint8 level apart (the parallel float32 sums round differently).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from models.testing import tiny_flux_pipeline

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")  # the openai client's notice
SIZE = 64  # the tiny FLUX serves 64x64 by default
STEPS = 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process (its own session, so a signal reaches only it), its log and its base URL."""

    def __init__(self, command: list[str], port: int, log: Path) -> None:
        self.port, self.log_path = port, log
        self.url = f"http://127.0.0.1:{port}"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with open(log, "w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"the server exited with {self.process.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.process.kill()
        pytest.fail(f"the server did not become healthy:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout_s: float = 120) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            pytest.fail(f"the server did not stop within {timeout_s} s:\n{self.log()[-4000:]}")

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=120)

    def post(self, body: object, timeout: float = 120, **kwargs: object) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/images/generations", json=body, timeout=timeout, **kwargs)


def _xdit() -> str:
    path = shutil.which("xdit")
    if path is None:
        pytest.fail("the xdit console script is not installed (pip install -e .)")
    return path


@pytest.fixture(scope="module")
def reference() -> object:
    """Images of the stock pipeline: ``reference(prompt, seeds)`` → PIL images (seed i for image i)."""
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)

    def images(prompt: str, seeds: list[int]) -> list[Image.Image]:
        return pipe(
            [prompt] * len(seeds), height=SIZE, width=SIZE, num_inference_steps=STEPS, guidance_scale=3.5,
            max_sequence_length=64, generator=[torch.Generator().manual_seed(s) for s in seeds],
        ).images  # fmt: skip

    return images


def _decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG" and image.size == (SIZE, SIZE)
    return image.convert("RGB")


def _close(a: Image.Image, b: Image.Image) -> None:
    diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    assert diff.max() <= 1, f"images differ by up to {diff.max()} levels"


def _metrics(server: Server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def _generate_concurrently(server: Server, requests: list[dict]) -> list[httpx.Response]:
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(server.post, requests))


# ------------------------------------------------------------------------------------------ one process
@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("one")
    port = _free_port()
    command = [_xdit(), "serve", "flux", "--port", str(port), "--max-batch-size", "4", "--max-wait-ms", "1500",
               "--max-queue", "8", "--output-dir", str(folder / "out")]  # fmt: skip
    server = Server(command, port, folder / "server.log")
    yield server
    if server.process.poll() is None:
        server.stop()


def test_openai_client_gets_the_pipelines_images(one: Server, reference: object) -> None:
    result = one.client().images.generate(
        model="flux-tiny", prompt="a lighthouse at dusk", n=2, size=f"{SIZE}x{SIZE}",
        response_format="b64_json", extra_body={"seed": 11, "num_inference_steps": STEPS},
    )  # fmt: skip
    assert len(result.data) == 2
    expected = reference("a lighthouse at dusk", [11, 12])
    for item, image in zip(result.data, expected, strict=True):
        _close(_decode(item.b64_json), image)
    models = one.client().models.list()
    assert [m.id for m in models.data] == ["flux-tiny"]


def test_concurrent_requests_are_batched_and_equal_each_alone(one: Server, reference: object) -> None:
    before = _metrics(one)
    requests = [{"prompt": f"prompt number {i}", "seed": 100 + i, "n": 1 + i % 2} for i in range(3)]  # 5 images
    responses = _generate_concurrently(one, requests)
    assert [r.status_code for r in responses] == [200] * 3, [r.text[:300] for r in responses]
    after = _metrics(one)
    batches = after["xdit_batch_requests_count"] - before.get("xdit_batch_requests_count", 0)
    assert batches < 3, "three concurrent compatible requests ran as three batches"
    for request, response in zip(requests, responses, strict=True):
        alone = one.post(request)
        assert alone.status_code == 200
        got = [_decode(d["b64_json"]) for d in response.json()["data"]]
        expected = [_decode(d["b64_json"]) for d in alone.json()["data"]]
        assert len(got) == request["n"] == len(expected)
        seeds = [request["seed"] + k for k in range(request["n"])]
        for a, b, c in zip(got, expected, reference(request["prompt"], seeds), strict=True):
            _close(a, b)
            _close(a, c)


def test_incompatible_requests_queue_and_finish(one: Server) -> None:
    sizes = [f"{SIZE}x{SIZE}", "32x32", "64x32"]
    responses = _generate_concurrently(one, [{"prompt": "x", "size": s, "seed": 1} for s in sizes])
    for size, response in zip(sizes, responses, strict=True):
        assert response.status_code == 200, response.text
        width, height = map(int, size.split("x"))
        image = Image.open(io.BytesIO(base64.b64decode(response.json()["data"][0]["b64_json"])))
        assert image.size == (width, height)


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"prompt": "x", "size": "63x64"}, 400, "size"),
        ({"prompt": "x", "size": "4096x4096"}, 400, "size"),
        ({"prompt": "x", "n": 99}, 400, "n"),
        ({"prompt": "x", "n": "2"}, 400, "n"),
        ({"prompt": ""}, 400, "prompt"),
        ({"size": "64x64"}, 400, "prompt"),
        ({"prompt": "x", "colour": "red"}, 400, "colour"),
        ({"prompt": "x", "model": "dall-e-3"}, 404, "model"),
        ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps"),
        ({"prompt": "x", "guidance_scale": "high"}, 400, "guidance_scale"),
        ({"prompt": "x", "seed": -1}, 400, "seed"),
        ({"prompt": "x", "response_format": "jpg"}, 400, "response_format"),
        ({"prompt": "x", "stream": True}, 400, "stream"),
        ({"prompt": "x", "true_cfg_scale": 4.0}, 400, "negative_prompt"),
        (["x"], 400, None),
    ],
)
def test_malformed_requests_get_4xx_and_the_server_still_answers(one: Server, body, status, param) -> None:
    response = one.post(body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_other_refusals(one: Server) -> None:
    bad_json = httpx.post(f"{one.url}/v1/images/generations", content=b"{not json", timeout=30)
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    video = httpx.post(f"{one.url}/v1/videos", json={"prompt": "x"}, timeout=30)
    assert video.status_code == 404 and "POST /v1/images/generations" in video.json()["error"]["message"]
    unknown = httpx.get(f"{one.url}/v1/nothing", timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError, match="multiples of 4"):
        one.client().images.generate(prompt="x", size="30x30")  # type: ignore[arg-type]
    assert one.post({"prompt": "still here", "seed": 3}).status_code == 200


def test_url_format_serves_the_image_and_other_formats(one: Server, reference: object) -> None:
    response = one.post({"prompt": "a red barn", "seed": 5, "response_format": "url"})
    assert response.status_code == 200, response.text
    url = response.json()["data"][0]["url"]
    content = httpx.get(url, timeout=30)
    assert content.status_code == 200 and content.headers["content-type"] == "image/png"
    _close(Image.open(io.BytesIO(content.content)).convert("RGB"), reference("a red barn", [5])[0])
    assert httpx.get(f"{one.url}/v1/images/img_nothing/content", timeout=30).status_code == 404
    for fmt, pil in (("jpeg", "JPEG"), ("webp", "WEBP")):
        data = one.post({"prompt": "x", "seed": 1, "output_format": fmt})
        assert data.status_code == 200
        assert Image.open(io.BytesIO(base64.b64decode(data.json()["data"][0]["b64_json"]))).format == pil


def test_a_client_that_goes_away_does_not_stall_the_others(one: Server) -> None:
    slow = {"prompt": "slow", "seed": 1, "size": "256x256", "num_inference_steps": 30}
    first = threading.Thread(target=lambda: results.append(one.post(slow)))
    results: list[httpx.Response] = []
    first.start()
    time.sleep(0.5)  # the slow one is running; the next one queues behind it (another size)
    with pytest.raises(httpx.TimeoutException):
        one.post({"prompt": "impatient", "seed": 2, "size": "32x32"}, timeout=1.0)
    first.join()
    assert results[0].status_code == 200
    assert one.post({"prompt": "after", "seed": 3}).status_code == 200
    deadline = time.monotonic() + 10
    while "withdrawn" not in one.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "a client went away; its queued request was withdrawn" in one.log()


def test_metrics_parse_and_count(one: Server) -> None:
    before = _metrics(one)
    assert one.post({"prompt": "counted", "seed": 9, "n": 2}).status_code == 200
    one.post({"prompt": "x", "n": 0})
    after = _metrics(one)
    assert after["xdit_images_generated_total"] - before["xdit_images_generated_total"] == 2
    key = "xdit_requests_total{endpoint=images,status=400}"
    assert after[key] - before.get(key, 0) == 1
    assert after["xdit_request_latency_seconds_count{endpoint=images}"] >= 1
    assert after["xdit_queue_length"] == 0


def test_bench_measures_the_server(one: Server, tmp_path: Path) -> None:
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    done = subprocess.run(
        [_xdit(), "bench", "--port", str(one.port), "--num-prompts", "4", "--concurrency-sweep", "1,2",
         "--size", "32x32", "--output-file", str(out), "--plot", str(plot), "--disable-tqdm"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    runs = json.loads(out.read_text())["runs"]
    assert [r["concurrency"] for r in runs] == [1, 2]
    for run in runs:
        assert run["completed"] == 4 and run["failed"] == 0 and run["images"] == 4
        assert 0 < run["latency_p50_s"] <= run["latency_p99_s"] and run["throughput_images_per_s"] > 0
    assert plot.stat().st_size > 0


def test_sigterm_drains_in_flight_requests_and_exits_zero(one: Server) -> None:
    results: list[httpx.Response] = []
    slow = {"prompt": "the last one", "seed": 4, "size": "128x128", "num_inference_steps": 20}
    worker = threading.Thread(target=lambda: results.append(one.post(slow)))
    worker.start()
    time.sleep(1.0)
    assert one.stop() == 0, one.log()[-3000:]
    worker.join()
    assert results and results[0].status_code == 200, results
    assert "draining" in one.log() and "rank 0: stopped cleanly" in one.log()


# ------------------------------------------------------------------------------------------ two ranks
@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("two")
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "serving.cli", "serve",
               "flux", "--ulysses-degree", "2", "--port", str(port), "--max-wait-ms", "1500", "--collective-timeout",
               "120", "--fault-injection", "1:denoise:EXPLODE", "--fault-injection", "1:prepare:REFUSE"]  # fmt: skip
    server = Server(command, port, folder / "server.log")
    yield server
    if server.process.poll() is None:
        server.stop()


def test_two_ranks_give_the_pipelines_images_batched_or_not(two: Server, reference: object) -> None:
    result = two.client().images.generate(prompt="two ranks", n=1, extra_body={"seed": 21})
    _close(_decode(result.data[0].b64_json), reference("two ranks", [21])[0])
    requests = [{"prompt": f"together {i}", "seed": 30 + i} for i in range(3)]
    responses = _generate_concurrently(two, requests)
    for request, response in zip(requests, responses, strict=True):
        assert response.status_code == 200, response.text
        _close(_decode(response.json()["data"][0]["b64_json"]), reference(request["prompt"], [request["seed"]])[0])


@pytest.mark.parametrize("word", ["EXPLODE", "REFUSE"])
def test_a_failure_on_rank_1_fails_that_request_only(two: Server, word: str, reference: object) -> None:
    with pytest.raises(openai.InternalServerError, match=f"rank 1: InjectedFault.*{word}"):
        two.client().images.generate(prompt=f"please {word}", extra_body={"seed": 1})
    requests = [{"prompt": f"{word} in a batch", "seed": 1}, {"prompt": "a healthy neighbour", "seed": 2}]
    bad, good = _generate_concurrently(two, requests)
    assert bad.status_code == 500 and "InjectedFault" in bad.json()["error"]["message"]
    assert good.status_code == 200
    _close(_decode(good.json()["data"][0]["b64_json"]), reference("a healthy neighbour", [2])[0])
    assert two.post({"prompt": "next", "seed": 3}).status_code == 200


def test_two_ranks_stop_cleanly_on_sigterm(two: Server) -> None:
    two.stop()  # torchrun forwards SIGTERM to both ranks (its own exit code reports the signal)
    log = two.log()
    assert "rank 0: stopped cleanly" in log and "rank 1: stopped cleanly" in log, log[-3000:]


# ------------------------------------------------------------------------------------------ video
def test_video_job_completes_and_its_mp4_decodes(tmp_path: Path) -> None:
    av = pytest.importorskip("av")
    port = _free_port()
    server = Server([_xdit(), "serve", "opensora", "--port", str(port)], port, tmp_path / "server.log")
    try:
        client = server.client()
        with pytest.raises(openai.BadRequestError, match="seconds"):
            client.videos.create(prompt="too long", seconds="12")
        job = client.videos.create(prompt="a fox in the snow", seconds="0.5")
        assert job.status == "queued" and job.id.startswith("video_")
        deadline = time.monotonic() + 240
        while job.status not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.5)
            job = client.videos.retrieve(job.id)
        assert job.status == "completed" and job.progress == 100, job
        path = tmp_path / "fox.mp4"
        path.write_bytes(client.videos.download_content(job.id).read())
        with av.open(str(path)) as container:
            frames = list(container.decode(video=0))
        assert len(frames) == 12 and (frames[0].width, frames[0].height) == (256, 144)
        assert job.id in [v.id for v in client.videos.list().data]
        missing = httpx.get(f"{server.url}/v1/videos/video_nothing/content", timeout=30)
        assert missing.status_code == 404
        images = server.post({"prompt": "x"})
        assert images.status_code == 404 and "POST /v1/videos" in images.json()["error"]["message"]
    finally:
        assert server.stop() == 0
