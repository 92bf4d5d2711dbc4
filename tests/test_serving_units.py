"""The server's parts without a server: request parsing, the batching scheduler, the PNG writer, the CLI's checks,
and the app's 429 / 503 answers (in-process, no engine)."""

from __future__ import annotations

import io
import random
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from serving.cli import main as xdit_main
from serving.engine import Fault, InjectedFault
from serving.scheduler import QueueFull, Scheduler
from serving.schema import ImageLimits, RequestError, VideoLimits, parse_image_request, parse_video_request
from serving.server import ServerState, create_app, png_bytes

LIMITS = ImageLimits("m", (64, 64), multiple=4, max_pixels=256 * 256, default_steps=4, max_steps=50, max_images=4,
                     min_height=8)  # fmt: skip
VIDEO = VideoLimits("v", (256, 144), multiple=16, max_pixels=256 * 256, default_frames=17, max_frames=51,
                    default_steps=4, max_steps=50)  # fmt: skip


def test_image_request_defaults_and_fields() -> None:
    r = parse_image_request({"prompt": "p"}, LIMITS, seed=7)
    assert (r.width, r.height, r.n, r.steps, r.seed, r.guidance_scale) == (64, 64, 1, 4, 7, 3.5)
    assert (r.response_format, r.output_format, r.true_cfg_scale, r.negative_prompt) == ("b64_json", "png", 1.0, None)
    r = parse_image_request(
        {"prompt": "p", "size": "128x32", "n": 2, "seed": 3, "num_inference_steps": 9, "guidance_scale": 5,
         "true_cfg_scale": 4, "negative_prompt": "blur", "model": "m", "quality": "auto", "user": "u"},
        LIMITS, seed=0,
    )  # fmt: skip
    assert (r.width, r.height, r.n, r.seed, r.steps, r.guidance_scale, r.true_cfg_scale) == (128, 32, 2, 3, 9, 5, 4)
    same_shape = {"size": "128x32", "num_inference_steps": 9, "guidance_scale": 5, "true_cfg_scale": 4}
    other = parse_image_request({"prompt": "q", "seed": 1, "negative_prompt": "x", **same_shape}, LIMITS, seed=0)
    assert other.batch_key() == r.batch_key()  # prompts and seeds differ, the computation's shape does not
    assert parse_image_request({"prompt": "p", "size": "64x128"}, LIMITS, seed=0).batch_key() != r.batch_key()


@pytest.mark.parametrize(
    "body,param,status",
    [
        ({"prompt": "p", "size": "64x4"}, "size", 400),  # below the mesh's least height
        ({"prompt": "p", "size": "64"}, "size", 400),
        ({"prompt": "p", "size": 64}, "size", 400),
        ({"prompt": "p", "n": 5}, "n", 400),
        ({"prompt": "p", "n": True}, "n", 400),
        ({"prompt": "p", "guidance_scale": float("nan")}, "guidance_scale", 400),
        ({"prompt": "p", "seed": 2**63 - 1, "n": 2}, "seed", 400),
        ({"prompt": "p", "negative_prompt": "x"}, "negative_prompt", 400),
        ({"prompt": "p", "background": "transparent"}, "background", 400),
        ({"prompt": "p", "quality": "hd"}, "quality", 400),
        ({"prompt": "p", "model": "other"}, "model", 404),
        ({"prompt": 3}, "prompt", 400),
    ],
)
def test_image_request_refusals(body: dict, param: str, status: int) -> None:
    with pytest.raises(RequestError) as e:
        parse_image_request(body, LIMITS, seed=0)
    assert e.value.param == param and e.value.status == status
    assert e.value.body()["error"]["param"] == param


def test_video_request() -> None:
    r = parse_video_request({"prompt": "p", "seconds": "1", "fps": 12}, VIDEO, seed=5)
    assert (r.num_frames, r.fps, r.width, r.height, r.seed) == (12, 12, 256, 144, 5)
    assert parse_video_request({"prompt": "p"}, VIDEO, seed=0).num_frames == 17
    assert parse_video_request({"prompt": "p", "num_frames": 33}, VIDEO, seed=0).num_frames == 33
    for body, param in (
        ({"prompt": "p", "seconds": "1", "num_frames": 3}, "seconds"),
        ({"prompt": "p", "seconds": "9"}, "seconds"),
        ({"prompt": "p", "seconds": "soon"}, "seconds"),
        ({"prompt": "p", "num_frames": 52}, "num_frames"),
        ({"prompt": "p", "size": "250x144"}, "size"),
    ):
        with pytest.raises(RequestError) as e:
            parse_video_request(body, VIDEO, seed=0)
        assert e.value.param == param, body
    a, b = (parse_video_request({"prompt": "p"}, VIDEO, seed=0) for _ in range(2))
    assert a.batch_key() != b.batch_key()  # videos never share a call


def _image(n: int = 1, size: str = "64x64") -> object:
    return parse_image_request({"prompt": "p", "n": n, "size": size}, LIMITS, seed=0)


def test_scheduler_batches_compatible_requests_oldest_first() -> None:
    s = Scheduler(max_batch_images=4, max_wait_s=0.0, max_queue=10)
    a, b, c, d, e = _image(2), _image(1, "32x32"), _image(1), _image(2), _image(1)
    futures = [s.submit(r) for r in (a, b, c, d, e)]
    assert len(s) == 5
    assert [x.request for x in s.next_batch(0)] == [a, c, e]  # d would make 5 images; b is another size
    assert [x.request for x in s.next_batch(0)] == [b]  # the oldest now, even though d is compatible with a
    assert [x.request for x in s.next_batch(0)] == [d]
    assert s.next_batch(0.01) is None
    assert s.cancel(futures[0]) is False  # handed out already
    f = s.submit(_image())
    assert s.cancel(f) and f.cancelled() and len(s) == 0


def test_scheduler_waits_for_company_then_starts() -> None:
    s = Scheduler(max_batch_images=3, max_wait_s=0.3, max_queue=10)
    start = time.monotonic()
    s.submit(_image())
    threading.Timer(0.1, lambda: s.submit(_image(2))).start()
    batch = s.next_batch(5)
    assert len(batch) == 2 and time.monotonic() - start < 0.29  # full at 3 images: no need to wait longer
    s.submit(_image())
    start = time.monotonic()
    assert len(s.next_batch(5)) == 1 and 0.25 < time.monotonic() - start < 2  # alone after the wait


def test_scheduler_bounds_closes_and_fails() -> None:
    s = Scheduler(max_batch_images=1, max_wait_s=10, max_queue=2)
    first, _ = s.submit(_image()), s.submit(_image())
    with pytest.raises(QueueFull):
        s.submit(_image())
    s.close()
    with pytest.raises(RuntimeError, match="shutting down"):
        s.submit(_image())
    assert len(s.next_batch(5)) == 1  # closed: drained without waiting for company
    assert s.fail_all(RuntimeError("gone")) == 1 and s.next_batch(5) is None
    assert not first.done()
    with pytest.raises(ValueError):
        Scheduler(max_batch_images=0, max_wait_s=0, max_queue=1)


def test_png_bytes_is_lossless() -> None:
    for width, height, level in ((7, 5, 0), (64, 33, 1), (1, 1, 9)):
        image = Image.frombytes("RGB", (width, height), random.randbytes(width * height * 3))
        decoded = Image.open(io.BytesIO(png_bytes(image.tobytes(), width, height, level)))
        assert decoded.format == "PNG" and decoded.tobytes() == image.tobytes()
    with pytest.raises(ValueError, match="rows"):
        png_bytes(b"123", 2, 2, 1)


def test_fault_specs() -> None:
    fault = Fault.parse("1:denoise:BOOM")
    fault.check(0, "denoise", ["BOOM"])  # another rank
    fault.check(1, "prepare", ["BOOM"])  # another stage
    with pytest.raises(InjectedFault):
        fault.check(1, "denoise", ["a", "x BOOM y"])
    for spec in ("1:denoise", "x:denoise:a", "1:decode:a", "1:prepare:"):
        with pytest.raises(ValueError, match="RANK:STAGE:TEXT"):
            Fault.parse(spec)


def test_app_answers_429_when_full_and_503_when_draining(tmp_path: Path) -> None:
    scheduler = Scheduler(max_batch_images=1, max_wait_s=0, max_queue=1)
    state = ServerState(LIMITS, scheduler, tmp_path)
    client = TestClient(create_app(state))
    scheduler.submit(_image())  # the queue is full; no engine takes it
    full = client.post("/v1/images/generations", json={"prompt": "p"})
    assert full.status_code == 429 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["type"] == "rate_limit_error"
    state.stopping = "draining"
    assert client.get("/health").status_code == 503
    assert client.post("/v1/images/generations", json={"prompt": "p"}).status_code == 503


@pytest.mark.parametrize(
    "argv,message",
    [
        (["serve"], "name the model"),
        (["serve", "sdxl"], "name the model"),
        (["frobnicate"], "unknown command"),
        (["serve", "flux", "--port", "0"], "must be a port"),
        (["serve", "flux", "--ring-degree", "3"], "does not divide the world size 1"),
        (["serve", "flux", "--fault-injection", "2:denoise:x"], "not below the world size 1"),
        (["serve", "opensora", "--max-batch-size", "2"], "videos run alone"),
        (["serve", "opensora", "--model-path", "/nowhere"], "or none"),
        (["serve", "flux", "--model-path", "/nowhere"], "--model-path"),
    ],
)
def test_cli_refuses_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        xdit_main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
