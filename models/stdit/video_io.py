"""Decoded video -> uint8 frames -> H.264 MP4, as Open-Sora's ``save_sample`` does it."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch


def video_to_uint8(video: torch.Tensor) -> torch.Tensor:
    """Decoded video ``[3, T, H, W]`` (nominal range [-1, 1], float) -> uint8 ``[T, H, W, 3]`` on the CPU.

    Open-Sora's mapping, in float32: clamp to [-1, 1], ``(x + 1) / 2``, ``x * 255 + 0.5`` clamped to
    [0, 255], truncated to uint8. NaN raises (it has no pixel value).
    """
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"video_to_uint8: video must be a tensor, got {type(video).__name__}")
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video_to_uint8: video must be [3, T, H, W] (RGB first), got {list(video.shape)}")
    if not video.is_floating_point():
        raise ValueError(f"video_to_uint8: video must be floating point in [-1, 1], got {video.dtype}")
    x = video.detach().to(torch.float32)
    nan = int(torch.isnan(x).sum())
    if nan:
        raise ValueError(f"video_to_uint8: video holds {nan} NaN values of {x.numel()}")
    x = (x.clamp(-1.0, 1.0) + 1.0) / 2.0
    x = x.mul(255).add_(0.5).clamp_(0, 255)
    return x.permute(1, 2, 3, 0).to("cpu", torch.uint8).contiguous()


def _import_av() -> Any:
    try:
        return importlib.import_module("av")
    except ImportError as e:
        raise ValueError(f"write_mp4 needs PyAV: `pip install av` ({e})") from e


def write_mp4(video: torch.Tensor, path: str | Path, *, fps: int = 24, crf: int = 18) -> Path:
    """Write an H.264 (libx264, yuv420p) MP4 of ``video`` and return its path.

    ``video``: a decoded float video ``[3, T, H, W]`` in [-1, 1] (mapped by ``video_to_uint8``) or
    uint8 frames ``[T, H, W, 3]``. ``H`` and ``W`` must be even (yuv420p halves both for colour);
    nothing is padded or cropped. ``crf``: 0 (lossless) .. 51, lower is better quality.
    """
    if not isinstance(video, torch.Tensor):
        raise ValueError(f"write_mp4: video must be a tensor, got {type(video).__name__}")
    if video.dtype == torch.uint8:
        if video.dim() != 4 or video.shape[-1] != 3:
            raise ValueError(f"write_mp4: uint8 frames must be [T, H, W, 3], got {list(video.shape)}")
        frames = video.detach().cpu().contiguous()
    else:
        frames = video_to_uint8(video)
    t, h, w, _ = frames.shape
    if t < 1 or h < 2 or w < 2 or h % 2 or w % 2:
        raise ValueError(
            f"write_mp4: H.264 yuv420p needs at least one frame and even height and width, got T={t}, H={h}, W={w}; "
            f"crop or pad to e.g. {h - h % 2}x{w - w % 2} first"
        )
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"write_mp4: fps must be a positive int, got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"write_mp4: crf must be an int in [0, 51], got {crf!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"write_mp4: the folder {path.parent} does not exist")
    av = _import_av()
    if "libx264" not in av.codecs_available:
        raise ValueError("write_mp4: this PyAV build has no libx264 encoder; install the PyPI wheel (`pip install av`)")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
    return path
