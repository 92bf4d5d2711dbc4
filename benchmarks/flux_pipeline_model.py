"""FLUX.1-dev's whole pipeline at real size with random weights: T5-XXL, CLIP-L, the transformer, the VAE.

Word-level tokenizers over a small vocabulary stand in for T5's and CLIP's (the same sequence
lengths: 512 and 77 tokens; the embedding tables have the real vocabulary sizes). The transformer's
weights are scaled as in :func:`flux_model.build_flux` so 57 blocks stay finite.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from flux_model import FLUX_DEV, build_flux
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
from vae_workload import FLUX_VAE

from models.testing import word_tokenizer

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768, bos_token_id=1, eos_token_id=0,
    pad_token_id=0,
)  # fmt: skip
SCHEDULER = dict(
    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
    max_image_seq_len=4096,
)  # fmt: skip


def build_flux_dev_pipeline(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> FluxPipeline:
    """The FLUX.1-dev pipeline with random weights (the same on every call and rank), built on ``device``."""
    transformer = build_flux(FLUX_DEV, device, dtype)
    torch.manual_seed(1)
    with torch.device(device):
        vae = AutoencoderKL(**FLUX_VAE).eval()
        clip = CLIPTextModel(CLIPTextConfig(**CLIP_L)).eval()
        t5 = T5EncoderModel(T5Config(**T5_XXL, feed_forward_proj="gated-gelu", is_encoder_decoder=False)).eval()
    clip_special = dict(
        unk_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER),
        vae=vae.to(dtype),
        text_encoder=clip.to(dtype),
        tokenizer=word_tokenizer(clip_special, 77),
        text_encoder_2=t5.to(dtype),
        tokenizer_2=word_tokenizer(dict(unk_token="<unk>", eos_token="</s>", pad_token="<pad>"), 512),
        transformer=transformer,
    )
    for module in (vae, clip, t5, transformer):
        module.requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
