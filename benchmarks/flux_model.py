"""FLUX.1-dev's transformer with random weights and one step's inputs: what the FLUX benchmarks time.

Needs only torch and diffusers (no library import), so a benchmark comparing two versions of the
library (``seam_overhead.py``) builds the same model under either.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxTransformer2DModel

FLUX_DEV = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)  # fmt: skip


def build_flux(config: dict, device: torch.device, dtype: torch.dtype) -> FluxTransformer2DModel:
    """The transformer with random weights (scaled ×0.5 so 57 blocks stay finite), the same on every rank."""
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**config).eval()
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    return model.requires_grad_(False)


def flux_inputs(config: dict, size: int, text: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A ``size × size`` image: ``(size/16)²`` packed latent tokens, ``text`` text tokens, batch 1."""
    side = size // 16
    gen = torch.Generator(device).manual_seed(size)
    ids = torch.zeros(side, side, 3, device=device)
    ids[..., 1] += torch.arange(side, device=device)[:, None]
    ids[..., 2] += torch.arange(side, device=device)[None, :]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device).to(dtype)

    return dict(
        hidden_states=randn(1, side * side, config["in_channels"]),
        encoder_hidden_states=randn(1, text, config["joint_attention_dim"]),
        pooled_projections=randn(1, config["pooled_projection_dim"]),
        timestep=torch.full((1,), 0.5, device=device, dtype=dtype),
        guidance=torch.full((1,), 3.5, device=device, dtype=dtype),
        img_ids=ids.flatten(0, 1),
        txt_ids=torch.zeros(text, 3, device=device),
        return_dict=False,
    )
