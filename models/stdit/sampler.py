"""Open-Sora 1.2's rectified-flow sampler over latents and given text embeddings.

``t_i = (1 − i/steps)·1000`` for ``i = 0 … steps−1``, each moved by the resolution- and
length-dependent transform ``t' = r·t / (1 + (r − 1)·t)`` (on ``t ∈ [0, 1]``) with
``r = sqrt(H·W / 512²) · sqrt(5·(num_frames // 17))`` (the second factor 1 for an image). Each step
runs the model once on the CFG batch ``[cond; uncond]`` (the unconditional text is the model's
learned null caption, masked like the prompt), combines ``v = v_u + cfg·(v_c − v_u)`` from the first
``in_channels`` output channels and moves ``z ← z + v·(t'_i − t'_{i+1})/1000`` (the last step to 0).
A parallel model (``parallelize_stdit``) runs the same sampler; its ``batch`` axis takes the pair.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from models.stdit.model import STDiT3

Tensor = torch.Tensor


def rflow_timesteps(
    steps: int, *, num_frames: int, height: int, width: int, num_timesteps: int = 1000, transform: bool = True
) -> list[float]:
    """The ``steps`` timesteps (0–1000 scale, decreasing) for a video of ``num_frames`` pixel frames."""
    if steps < 1:
        raise ValueError(f"rflow_timesteps: steps must be at least 1, got {steps}")
    ts = [(1 - i / steps) * num_timesteps for i in range(steps)]
    if not transform:
        return ts
    frames = 1 if num_frames == 1 else 5 * (num_frames // 17)
    ratio = math.sqrt(height * width / 512**2) * math.sqrt(max(frames, 1))
    out = []
    for t in ts:
        u = t / num_timesteps
        out.append(ratio * u / (1 + (ratio - 1) * u) * num_timesteps)
    return out


@torch.no_grad()
def rflow_sample(
    model: STDiT3 | Callable[..., Tensor],
    z: Tensor,
    y: Tensor,
    mask: Tensor | None = None,
    *,
    num_frames: int,
    height: int,
    width: int,
    steps: int = 30,
    cfg_scale: float = 7.0,
    fps: float | None = None,
    y_null: Tensor | None = None,
    num_timesteps: int = 1000,
    progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
) -> Tensor:
    """Denoise ``z`` ``[B, C, T, H, W]`` (noise) conditioned on ``y`` ``[B, 1, L, 4096]`` with ``mask``
    ``[B, L]``; returns the final latents. ``num_frames``, ``height``, ``width``: the video's pixel size
    (for the timestep transform and the model's conditioning). ``y_null``: the unconditional text
    (default: the model's ``y_embedder.y_embedding``). ``progress`` wraps the step range (e.g. tqdm)."""
    base = model if isinstance(model, STDiT3) else None
    if y_null is None:
        if base is None:
            raise ValueError("rflow_sample: pass y_null when the model is not an STDiT3")
        y_null = base.y_embedder.y_embedding[None, None].expand(y.shape[0], 1, -1, -1).to(y.device, y.dtype)
    if z.dim() != 5 or y.dim() != 4 or y.shape[0] != z.shape[0] or y_null.shape != y.shape:
        raise ValueError(
            f"rflow_sample: z must be [B, C, T, H, W] and y, y_null [B, 1, L, C_text] with the same B; got z "
            f"{list(z.shape)}, y {list(y.shape)}, y_null {list(y_null.shape)}"
        )
    ts = rflow_timesteps(steps, num_frames=num_frames, height=height, width=width, num_timesteps=num_timesteps)
    batch, channels = z.shape[0], z.shape[1]
    y_pair = torch.cat([y, y_null])
    mask_pair = None if mask is None else torch.cat([mask, mask])  # the null caption is cut to the prompt's length
    for i in progress(range(steps)) if progress else range(steps):
        t = torch.full((2 * batch,), ts[i], device=z.device, dtype=z.dtype)
        out = model(torch.cat([z, z]), t, y_pair, mask_pair, fps=fps, height=height, width=width)
        v_cond, v_uncond = out[:, :channels].chunk(2, dim=0)
        v = v_uncond + cfg_scale * (v_cond - v_uncond)
        dt = (ts[i] - (ts[i + 1] if i + 1 < steps else 0.0)) / num_timesteps
        z = z + (v * dt).to(z.dtype)
    return z
