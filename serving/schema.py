"""The HTTP requests, checked: the OpenAI Images and Videos fields plus SGLang's extensions, parsed into
frozen records before any rank sees them, and the OpenAI error body for everything refused.

A request is refused (:class:`RequestError`, a 4xx with ``{"error": {message, type, param, code}}``) for
an unknown field, a field of the wrong type, or a value out of the served model's range
(:class:`ImageLimits`, :class:`VideoLimits`); nothing is clamped or dropped silently. Fields of the
OpenAI schema that a diffusion model cannot honour (``background="transparent"``, ``quality`` other than
``auto``, ``stream``) are refused by name rather than ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_SEED = 2**63  # what a torch generator takes in every process
IMAGE_FORMATS = ("png", "jpeg", "webp")


class RequestError(Exception):
    """A refused request: its HTTP status and the OpenAI error fields."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    @property
    def type(self) -> str:
        return {404: "not_found_error", 429: "rate_limit_error"}.get(self.status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(str(self), self.type, param=self.param, code=self.code)


def error_body(message: str, type: str, *, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """The OpenAI error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


@dataclass(frozen=True)
class ImageLimits:
    """What the served image model accepts: its id, default and largest size, pixel multiple, steps, images."""

    model: str
    default_size: tuple[int, int]  # (width, height)
    multiple: int
    max_pixels: int
    default_steps: int
    max_steps: int
    max_images: int
    default_guidance: float = 3.5
    min_height: int = 0  # the parallel VAE decodes row bands: at least one latent row per rank


@dataclass(frozen=True)
class VideoLimits:
    """What the served video model accepts."""

    model: str
    default_size: tuple[int, int]  # (width, height)
    multiple: int
    max_pixels: int
    default_frames: int
    max_frames: int
    default_steps: int
    max_steps: int
    default_guidance: float = 7.0


@dataclass(frozen=True)
class ImageRequest:
    """One ``POST /v1/images/generations``: ``n`` images, image ``i`` drawn from ``seed + i``."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance_scale: float
    true_cfg_scale: float
    negative_prompt: str | None
    seed: int
    response_format: str
    output_format: str
    output_compression: int

    def batch_key(self) -> tuple[Any, ...]:
        """Requests with equal keys run as one batch: everything that shapes the computation but the prompts."""
        return ("image", self.width, self.height, self.steps, self.guidance_scale, self.true_cfg_scale)


@dataclass(frozen=True)
class VideoRequest:
    """One ``POST /v1/videos``."""

    prompt: str
    width: int
    height: int
    num_frames: int
    fps: int
    steps: int
    guidance_scale: float
    seed: int

    def batch_key(self) -> tuple[Any, ...]:
        return ("video", id(self))  # videos run one at a time (the sampler draws one noise tensor per call)


def parse_image_request(body: object, limits: ImageLimits, *, seed: int) -> ImageRequest:
    """The checked request; ``seed`` is used when the body has none (drawn by the server)."""
    fields = _Fields(body, known=_IMAGE_FIELDS)
    fields.model(limits.model)
    prompt = fields.text("prompt", required=True)
    n = fields.integer("n", 1, limits.max_images, default=1)
    width, height = fields.size(limits.default_size, limits.multiple, limits.max_pixels)
    if height < limits.min_height:
        raise RequestError(
            f"size {width}x{height}: the height must be at least {limits.min_height} on this server's mesh "
            "(its VAE decodes one band of latent rows per rank)", param="size",
        )  # fmt: skip
    steps = fields.integer("num_inference_steps", 1, limits.max_steps, default=limits.default_steps)
    guidance = fields.number("guidance_scale", 0.0, 100.0, default=limits.default_guidance)
    true_cfg = fields.number("true_cfg_scale", 1.0, 100.0, default=1.0)
    negative = fields.text("negative_prompt", required=False)
    if true_cfg > 1 and negative is None:
        raise RequestError(f"true_cfg_scale {true_cfg} needs a negative_prompt", param="negative_prompt")
    if true_cfg == 1 and negative is not None:
        raise RequestError("negative_prompt is used only with true_cfg_scale > 1", param="negative_prompt")
    response_format = fields.choice("response_format", ("b64_json", "url"), default="b64_json")
    output_format = fields.choice("output_format", IMAGE_FORMATS, default="png")
    compression = fields.integer("output_compression", 0, 101, default=100)
    fields.choice("quality", ("auto",), default="auto")
    fields.choice("background", ("auto", "opaque"), default="auto")
    fields.choice("style", ("natural", "vivid"), default="vivid")  # DALL·E only: no effect, accepted for old clients
    fields.exactly("stream", False)
    fields.exactly("partial_images", 0)
    fields.text("user", required=False)
    seed = fields.integer("seed", 0, MAX_SEED, default=seed)
    if seed + n > MAX_SEED:
        raise RequestError(
            f"seed + n must be below 2**63 (image i is drawn from seed + i), got {seed} + {n}", param="seed"
        )
    return ImageRequest(
        prompt, n, width, height, steps, guidance, true_cfg, negative, seed, response_format, output_format, compression
    )


def parse_video_request(body: object, limits: VideoLimits, *, seed: int) -> VideoRequest:
    """The checked video request; the length from ``num_frames`` or ``seconds`` (at ``fps``, default 24)."""
    fields = _Fields(body, known=_VIDEO_FIELDS)
    fields.model(limits.model)
    prompt = fields.text("prompt", required=True)
    width, height = fields.size(limits.default_size, limits.multiple, limits.max_pixels)
    fps = fields.integer("fps", 1, 121, default=24)
    frames = fields.integer("num_frames", 1, limits.max_frames + 1, default=None)
    seconds = fields.positive("seconds", limits.max_frames / fps)
    if frames is not None and seconds is not None:
        raise RequestError("pass num_frames or seconds, not both", param="seconds")
    if seconds is not None:
        frames = max(1, round(seconds * fps))
        if frames > limits.max_frames:
            raise RequestError(
                f"{seconds} s at {fps} fps is {frames} frames, above {limits.max_frames}", param="seconds"
            )
    steps = fields.integer("num_inference_steps", 1, limits.max_steps, default=limits.default_steps)
    guidance = fields.number("guidance_scale", 0.0, 100.0, default=limits.default_guidance)
    seed = fields.integer("seed", 0, MAX_SEED, default=seed)
    return VideoRequest(prompt, width, height, frames or limits.default_frames, fps, steps, guidance, seed)


_IMAGE_FIELDS = frozenset(
    "prompt model n size response_format output_format output_compression quality background style stream "
    "partial_images user num_inference_steps guidance_scale true_cfg_scale negative_prompt seed".split()
)
_VIDEO_FIELDS = frozenset("prompt model size seconds num_frames fps num_inference_steps guidance_scale seed".split())


class _Fields:
    """Reads a JSON object's fields, each checked; a refusal names the field (OpenAI's ``param``)."""

    def __init__(self, body: object, *, known: frozenset[str]) -> None:
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        unknown = sorted(set(body) - known)
        if unknown:
            raise RequestError(f"Unknown parameter: {unknown[0]!r}.", param=unknown[0], code="unknown_parameter")
        self.body = body

    def model(self, served: str) -> None:
        name = self.body.get("model")
        if name is not None and name != served:
            raise RequestError(
                f"The model {name!r} does not exist: this server serves {served!r}",
                status=404, param="model", code="model_not_found",
            )  # fmt: skip

    def text(self, name: str, *, required: bool) -> str | None:
        value = self.body.get(name)
        if value is None:
            if required:
                raise RequestError(
                    f"Missing required parameter: {name!r}.", param=name, code="missing_required_parameter"
                )
            return None
        if not isinstance(value, str) or (required and not value.strip()):
            raise RequestError(f"{name} must be a non-empty string", param=name)
        if len(value) > 32000:
            raise RequestError(f"{name} is {len(value)} characters; at most 32000", param=name)
        return value

    def integer(self, name: str, low: int, high: int, *, default: int | None) -> int | None:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
            raise RequestError(f"{name} must be an integer in [{low}, {high - 1}], got {value!r}", param=name)
        return value

    def number(self, name: str, low: float, high: float, *, default: float) -> float:
        value = self.body.get(name)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise RequestError(f"{name} must be a finite number, got {value!r}", param=name)
        if not low <= value <= high:
            raise RequestError(f"{name} must be in [{low}, {high}], got {value}", param=name)
        return float(value)

    def positive(self, name: str, high: float) -> float | None:
        """A number in ``(0, high]``, given as a JSON number or a string (OpenAI's ``seconds`` is ``"4"``)."""
        value = self.body.get(name)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise RequestError(f"{name} must be a number, got {value!r}", param=name) from None
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= high:
            raise RequestError(f"{name} must be a number in (0, {high:.4g}], got {value!r}", param=name)
        return float(value)

    def choice(self, name: str, options: tuple[str, ...], *, default: str) -> str:
        value = self.body.get(name)
        if value is None:
            return default
        if value not in options:
            raise RequestError(f"{name} must be one of {list(options)} on this server, got {value!r}", param=name)
        return value

    def exactly(self, name: str, allowed: object) -> None:
        value = self.body.get(name)
        if value is not None and (value != allowed or type(value) is not type(allowed)):
            raise RequestError(f"{name}={value!r} is not supported by this server", param=name)

    def size(self, default: tuple[int, int], multiple: int, max_pixels: int) -> tuple[int, int]:
        value = self.body.get("size")
        if value is None or value == "auto":
            return default
        parts = value.split("x") if isinstance(value, str) else []
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise RequestError(f"size must be 'WxH' (e.g. '1024x1024') or 'auto', got {value!r}", param="size")
        width, height = int(parts[0]), int(parts[1])
        if width < multiple or height < multiple or width % multiple or height % multiple:
            raise RequestError(
                f"size {value}: width and height must be positive multiples of {multiple} for this model", param="size"
            )
        if width * height > max_pixels:
            raise RequestError(f"size {value} has {width * height} pixels; at most {max_pixels} here", param="size")
        return width, height
