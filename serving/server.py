"""The HTTP side, on rank 0: an OpenAI-compatible FastAPI app over the scheduler, and its Prometheus metrics.

Every request is checked here (:mod:`serving.schema`) before any rank sees it: a refusal is a 4xx with
the OpenAI error body. Accepted requests are queued (429 when the queue is full, 503 while the server
drains) and answered when the engine resolves them; a client that goes away is withdrawn from the
queue (polled every 0.25 s) and never holds up the others. Images come back as ``b64_json`` or as
a ``url`` this server serves; videos are asynchronous jobs (OpenAI's Videos API) whose MP4 is written
to ``output_dir``. Stores are bounded: the oldest finished images and videos are deleted first.

All state is one :class:`ServerState` per app (no module globals); :func:`create_app` builds the app.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import struct
import threading
import time
import zlib
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.engine import EngineStopped
from serving.scheduler import Entry, QueueFull, Scheduler
from serving.schema import (
    ImageLimits,
    ImageRequest,
    RequestError,
    VideoLimits,
    VideoRequest,
    error_body,
    parse_image_request,
    parse_video_request,
)

log = logging.getLogger("xdit.serve")
MEDIA = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600, float("inf"))
# A video create sent as multipart/form-data (the openai client does) carries strings; these are numbers.
_FORM_INTEGERS = ("fps", "num_frames", "num_inference_steps", "seed")
_FORM_NUMBERS = ("guidance_scale",)


class Metrics:
    """The server's Prometheus metrics, in a registry of its own."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("xdit_requests", "HTTP requests answered", ["endpoint", "status"], registry=r)
        self.latency = Histogram(
            "xdit_request_latency_seconds", "arrival to answer of successful generations", ["endpoint"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_seconds = Histogram(
            "xdit_batch_seconds", "one batch's run on the mesh", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "xdit_batch_requests", "requests run as one batch", buckets=(1, 2, 3, 4, 6, 8, 16, 32), registry=r
        )
        self.encode_seconds = Histogram(
            "xdit_encode_seconds", "a response's images encoded", buckets=LATENCY_BUCKETS, registry=r
        )
        self.images = Counter("xdit_images_generated", "images generated", registry=r)
        self.videos = Counter("xdit_videos_generated", "videos generated", registry=r)
        self.queue = Gauge("xdit_queue_length", "requests waiting for the engine", registry=r)
        self.queue.set_function(lambda: len(scheduler))
        self.in_flight = Gauge("xdit_requests_in_flight", "generation requests being answered", registry=r)

    def on_batch(self, entries: list[Entry], seconds: float) -> None:
        """The engine's report of a finished batch (rank 0)."""
        self.batch_seconds.observe(seconds)
        self.batch_size.observe(len(entries))
        for entry in entries:
            if entry.future.exception() is None:
                if isinstance(entry.request, ImageRequest):
                    self.images.inc(entry.request.n)
                else:
                    self.videos.inc()


@dataclass
class VideoJob:
    """A ``POST /v1/videos`` job, as OpenAI's ``Video`` object reports it."""

    id: str
    request: VideoRequest
    model: str
    created_at: int = field(default_factory=lambda: int(time.time()))
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    error: dict[str, str] | None = None
    path: Path | None = None
    future: Future | None = None

    def on_progress(self, fraction: float) -> None:
        self.status, self.progress = "in_progress", min(99, int(fraction * 100))  # 100 once the MP4 is written

    def body(self) -> dict[str, Any]:
        r = self.request
        return {
            "id": self.id, "object": "video", "status": self.status, "progress": self.progress,
            "created_at": self.created_at, "completed_at": self.completed_at, "expires_at": None,
            "model": self.model, "prompt": r.prompt, "seconds": f"{r.num_frames / r.fps:g}",
            "size": f"{r.width}x{r.height}", "num_frames": r.num_frames, "fps": r.fps, "seed": r.seed,
            "error": self.error,
        }  # fmt: skip


class ServerState:
    """What one app serves: the model's limits, the queue, the stores, the metrics, whether it is stopping."""

    def __init__(
        self,
        limits: ImageLimits | VideoLimits,
        scheduler: Scheduler,
        output_dir: Path,
        *,
        max_stored: int = 1000,
        png_level: int = 0,
    ) -> None:
        self.limits, self.scheduler, self.output_dir, self.max_stored = limits, scheduler, output_dir, max_stored
        self.png_level = png_level
        self.kind = "image" if isinstance(limits, ImageLimits) else "video"
        self.metrics = Metrics(scheduler)
        self.stopping: str | None = None  # why /health answers 503
        self.images: OrderedDict[str, Path] = OrderedDict()
        self.videos: OrderedDict[str, VideoJob] = OrderedDict()
        self.lock = threading.Lock()
        self.writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="xdit-encode")
        (output_dir / "images").mkdir(parents=True, exist_ok=True)
        (output_dir / "videos").mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------------------ stores
    def keep_image(self, data: bytes, fmt: str) -> str:
        image_id = f"img_{secrets.token_hex(12)}"
        path = self.output_dir / "images" / f"{image_id}.{fmt}"
        path.write_bytes(data)
        with self.lock:
            self.images[image_id] = path
            while len(self.images) > self.max_stored:
                _, old = self.images.popitem(last=False)
                old.unlink(missing_ok=True)
        return image_id

    def add_job(self, job: VideoJob) -> None:
        with self.lock:
            self.videos[job.id] = job
            finished = [j for j in self.videos.values() if j.status in ("completed", "failed")]
            for old in finished[: max(0, len(self.videos) - self.max_stored)]:
                self._drop(old)

    def _drop(self, job: VideoJob) -> None:
        del self.videos[job.id]
        if job.path is not None:
            job.path.unlink(missing_ok=True)

    def finish_job(self, job: VideoJob, future: Future) -> None:
        """The engine resolved ``job``'s future: write its MP4 (in the writer pool) or record the failure."""
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            job.status, job.error = "failed", {"code": "generation_failed", "message": str(error)}
            job.completed_at = int(time.time())
            return
        self.writer.submit(self._write_video, job, future.result())

    def _write_video(self, job: VideoJob, video: Any) -> None:
        from models.stdit.video_io import write_mp4  # PyAV is needed by video servers only

        try:
            path = write_mp4(video, self.output_dir / "videos" / f"{job.id}.mp4", fps=job.request.fps)
        except Exception as e:
            log.exception("writing the MP4 of %s failed", job.id)
            job.status, job.error = "failed", {"code": "encoding_failed", "message": f"{type(e).__name__}: {e}"}
        else:
            job.path, job.status, job.progress = path, "completed", 100
        job.completed_at = int(time.time())


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app of ``state``: the OpenAI routes, ``/health``, ``/v1/models`` and ``/metrics``."""
    app = FastAPI(title="xdit serve", docs_url=None, redoc_url=None)
    metrics, limits, scheduler = state.metrics, state.limits, state.scheduler

    def answer(endpoint: str, status: int, body: Any) -> JSONResponse:
        metrics.requests.labels(endpoint, str(status)).inc()
        return JSONResponse(body, status_code=status)

    def refuse(endpoint: str, error: RequestError) -> JSONResponse:
        response = answer(endpoint, error.status, error.body())
        if error.status == 429:
            response.headers["retry-after"] = "1"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(error_body(message, kind), status_code=exc.status_code)

    def wrong_kind(endpoint: str) -> JSONResponse:
        other = "POST /v1/videos" if state.kind == "video" else "POST /v1/images/generations"
        message = f"this server serves the {state.kind} model {limits.model!r}: use {other}"
        return refuse(endpoint, RequestError(message, status=404, code="wrong_model_kind"))

    def queue(request: Any, progress: Any = None) -> Future:
        if state.stopping is not None:
            raise RequestError(f"the server is {state.stopping}", status=503, code="server_unavailable")
        try:
            return scheduler.submit(request, progress)
        except QueueFull as e:
            raise RequestError(str(e), status=429, code="queue_full") from None
        except RuntimeError as e:
            raise RequestError(str(e), status=503, code="server_unavailable") from None

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.stopping is not None:
            return JSONResponse({"status": state.stopping}, status_code=503)
        return JSONResponse({"status": "ok", "model": limits.model, "queue": len(scheduler)})

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": limits.model, "object": "model", "created": 0, "owned_by": "xdit", "task": state.kind}
        return JSONResponse({"object": "list", "data": [card]})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/images/generations")
    async def images(request: Request) -> Response:
        endpoint, start = "images", time.perf_counter()
        if state.kind != "image":
            return wrong_kind(endpoint)
        try:
            body = await _json(request)
            parsed = parse_image_request(body, limits, seed=secrets.randbelow(2**31))
            future = queue(parsed)
        except RequestError as e:
            return refuse(endpoint, e)
        metrics.in_flight.inc()
        try:
            result = await _wait(request, future, scheduler)
        except _ClientGone:
            return answer(endpoint, 499, error_body("the client closed the connection", "client_closed"))
        except Exception as e:
            return answer(endpoint, _status(e), error_body(str(e), "server_error"))
        finally:
            metrics.in_flight.dec()
        with metrics.encode_seconds.time():
            encoded = await run_in_threadpool(_encode, result, parsed, state.png_level)
        items = []
        for blob in encoded:
            if parsed.response_format == "b64_json":
                items.append(b'{"b64_json":"' + base64.b64encode(blob) + b'"}')  # no JSON escaping in base64
            else:
                image_id = await run_in_threadpool(state.keep_image, blob, parsed.output_format)
                url = f"{str(request.base_url).rstrip('/')}/v1/images/{image_id}/content"
                items.append(json.dumps({"url": url}).encode())
        head = {"created": int(time.time()), "size": f"{parsed.width}x{parsed.height}",
                "output_format": parsed.output_format, "seed": parsed.seed}  # fmt: skip
        content = json.dumps(head).encode()[:-1] + b', "data": [' + b",".join(items) + b"]}"
        metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
        metrics.requests.labels(endpoint, "200").inc()
        return Response(content, media_type="application/json")  # megabytes of base64: not through json.dumps

    @app.get("/v1/images/{image_id}/content")
    async def image_content(image_id: str) -> Response:
        path = state.images.get(image_id)
        if path is None or not path.exists():
            return refuse("image_content", RequestError(f"no image {image_id!r} here", status=404, param="image_id"))
        return FileResponse(path, media_type=MEDIA[path.suffix[1:]])

    @app.post("/v1/videos")
    async def create_video(request: Request) -> Response:
        endpoint = "videos"
        if state.kind != "video":
            return wrong_kind(endpoint)
        try:
            body = await _video_body(request)
            parsed = parse_video_request(body, limits, seed=secrets.randbelow(2**31))
            job = VideoJob(f"video_{secrets.token_hex(16)}", parsed, limits.model)
            job.future = queue(parsed, job.on_progress)
        except RequestError as e:
            return refuse(endpoint, e)
        state.add_job(job)
        job.future.add_done_callback(lambda f: state.finish_job(job, f))
        return answer(endpoint, 200, job.body())

    @app.get("/v1/videos")
    async def list_videos() -> JSONResponse:
        data = [job.body() for job in reversed(list(state.videos.values()))]  # newest first, as OpenAI lists
        ids = [d["id"] for d in data]
        return JSONResponse({"object": "list", "data": data, "first_id": ids[0] if ids else None,
                             "last_id": ids[-1] if ids else None, "has_more": False})  # fmt: skip

    def find(video_id: str) -> VideoJob:
        job = state.videos.get(video_id)
        if job is None:
            raise RequestError(f"no video {video_id!r} here", status=404, param="video_id")
        return job

    @app.get("/v1/videos/{video_id}")
    async def get_video(video_id: str) -> JSONResponse:
        try:
            return JSONResponse(find(video_id).body())
        except RequestError as e:
            return refuse("video", e)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str) -> Response:
        try:
            job = find(video_id)
            if job.status != "completed" or job.path is None:
                raise RequestError(f"video {video_id} is not ready (status: {job.status})", param="video_id")
        except RequestError as e:
            return refuse("video_content", e)
        return FileResponse(job.path, media_type="video/mp4", filename=f"{video_id}.mp4")

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str) -> JSONResponse:
        try:
            job = find(video_id)
            if job.status in ("queued", "in_progress") and not scheduler.cancel(job.future):
                raise RequestError(f"video {video_id} is being generated; delete it once it is done", status=409)
        except RequestError as e:
            return refuse("video", e)
        with state.lock:
            state._drop(job)
        return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})

    return app


class _ClientGone(Exception):
    pass


async def _wait(request: Request, future: Future, scheduler: Scheduler) -> Any:
    """The future's result; if the client disconnects first, its request leaves the queue (if still there)."""
    waiting = asyncio.wrap_future(future)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.25)
        if done:
            return waiting.result()
        if await request.is_disconnected():
            if scheduler.cancel(future):
                log.info("a client went away; its queued request was withdrawn")
            raise _ClientGone


def _status(error: Exception) -> int:
    return 503 if isinstance(error, EngineStopped) else 500


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise RequestError("the request body is not valid JSON") from None


async def _video_body(request: Request) -> dict[str, Any]:
    """The create fields from JSON or multipart/form-data (numbers arrive as strings in a form)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        return await _json(request)
    form = await request.form()
    if "input_reference" in form:
        raise RequestError("input_reference (image-to-video) is not supported: text-to-video only",
                           param="input_reference")  # fmt: skip
    body: dict[str, Any] = {}
    for name, value in form.items():
        if not isinstance(value, str):
            raise RequestError(f"{name} must be a form field, not a file", param=name)
        body[name] = value
        try:
            if name in _FORM_INTEGERS:
                body[name] = int(value)
            elif name in _FORM_NUMBERS:
                body[name] = float(value)
        except ValueError:
            raise RequestError(f"{name} must be a number, got {value!r}", param=name) from None
    return body


def _encode(images: list[Any], request: ImageRequest, png_level: int) -> list[bytes]:
    """The PIL images as PNG (:func:`png_bytes`), JPEG or WebP (``output_compression`` is their quality)."""
    out = []
    for image in images:
        if request.output_format == "png":
            rgb = image.convert("RGB")
            out.append(png_bytes(rgb.tobytes(), rgb.width, rgb.height, png_level))
            continue
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format=request.output_format.upper(), quality=request.output_compression)
        out.append(buffer.getvalue())
    return out


def png_bytes(rgb: bytes, width: int, height: int, level: int) -> bytes:
    """A lossless PNG of ``rgb`` (8-bit RGB rows, top first): no row filter, zlib at ``level`` (0 stores).

    Pillow tries every row filter (smaller files, ~0.1 s for a 1024² image even at level 1); stored
    (level 0, ``xdit serve``'s default) a 1024² image takes ~12 ms (``--png-level``; docs/performance.md).
    """
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(f"png_bytes: {len(rgb)} bytes are not {height} rows of {width} RGB pixels")
    rows = b"".join(b"\x00" + rgb[i : i + stride] for i in range(0, len(rgb), stride))  # filter type 0 per row

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    idat = zlib.compress(rows, level)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
