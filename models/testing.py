"""Tiny random models of the real architectures, for tests, examples, benchmarks and docs on a CPU.

Nothing here is needed to run a real model: every builder makes a toy-size model of the published
architecture with random weights, the same for the same ``seed`` in every process, and needs no
download. FLUX: :func:`tiny_flux_transformer` (``TINY_FLUX_CONFIG``), :func:`tiny_flux_pipeline`
(tokenizers included), :func:`save_and_reload`. Open-Sora 1.2: :func:`tiny_t5_text_encoder` (a
byte-level T5) and :func:`tiny_opensora_pipeline` (STDiT3, the video VAE and that T5).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers import models as tok_models
from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

from models.stdit.config import STDiT3Config
from models.stdit.model import STDiT3
from models.stdit.pipeline import OpenSoraPipeline
from models.stdit.temporal_vae import TemporalVAEConfig
from models.stdit.text import T5TextEncoder
from models.stdit.video_vae import OpenSoraVAE, OpenSoraVAEConfig

# ---- FLUX: the whole path on a CPU in seconds ----

_WORDS = (
    "a an the of and in on with at by from to photo painting picture image portrait landscape city street forest "
    "mountain river sea sky sun moon night day cat dog bird horse fish tree flower house car boat red green blue "
    "yellow black white golden small large old young bright dark beautiful detailed high quality sharp blurry"
).split()


def word_tokenizer(special: dict[str, str], max_length: int) -> Any:
    """A whitespace word-level tokenizer over a small vocabulary (unknown words map to the unk token)."""
    names = list(dict.fromkeys(special.values()))
    vocab = {w: i for i, w in enumerate(names + _WORDS)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token=special["unk_token"]))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=max_length, **special)


TINY_FLUX_CONFIG = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=16,
    num_attention_heads=3,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def tiny_flux_transformer(seed: int = 0, **overrides: Any) -> FluxTransformer2DModel:
    """A ``FluxTransformer2DModel`` of FLUX's architecture at toy size (``TINY_FLUX_CONFIG`` with
    ``overrides``), random weights: the same ``seed`` gives the same weights in every process."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(**{**TINY_FLUX_CONFIG, **overrides}).eval()


def tiny_flux_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> FluxPipeline:
    """A ``FluxPipeline`` of FLUX's architecture at toy size with random weights, tokenizers included.

    The same ``seed`` gives the same weights in every process. 32×32 images are 16×16 latents and
    64 image tokens; ``max_sequence_length`` up to 128.
    """
    transformer = tiny_flux_transformer(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        scaling_factor=1.5035,
        shift_factor=0.0609,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip_special = dict(
        unk_token="<|endoftext|>", bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    tokenizer = word_tokenizer(clip_special, 77)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            bos_token_id=1,
            eos_token_id=0,
            pad_token_id=0,
        )
    )
    tokenizer_2 = word_tokenizer(dict(unk_token="<unk>", eos_token="</s>", pad_token="<pad>"), 128)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            pad_token_id=2,
            eos_token_id=1,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    for module in (vae, text_encoder, text_encoder_2):
        module.eval()  # as from_pretrained leaves them (T5's dropout is on in a freshly built model)
    pipe.set_progress_bar_config(disable=True)
    return pipe if dtype == torch.float32 else pipe.to(dtype)


def save_and_reload(pipe: FluxPipeline) -> FluxPipeline:
    """``pipe`` through ``save_pretrained`` / ``FluxPipeline.from_pretrained`` (safetensors) in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="xdit_flux_") as folder:
        pipe.save_pretrained(folder, safe_serialization=True)
        return FluxPipeline.from_pretrained(folder)


# ---- Open-Sora 1.2: STDiT3, the video VAE and a byte-level T5 ----


def tiny_t5_text_encoder(
    *, seed: int = 0, d_model: int = 32, max_length: int = 300, dtype: torch.dtype = torch.float32
) -> T5TextEncoder:
    """A toy T5 encoder of Open-Sora's interface, built without downloads or sentencepiece.

    The tokenizer is byte-level: ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then byte ``b`` is id ``3 + b``;
    like T5 it appends ``</s>``. The model is a random 2-layer ``T5EncoderModel`` (2 heads of 16,
    d_ff 64, gated GELU as in T5 v1.1); the same ``seed`` gives the same weights in every process.
    """
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"tiny_t5_text_encoder: d_model must be a positive int, got {d_model!r}")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    # No merges and no byte tokens as text: every character falls back to its UTF-8 bytes.
    backend = Tokenizer(tok_models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=max_length,
        padding_side="right",
    )
    config = T5Config(
        vocab_size=len(vocab),
        d_model=d_model,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        dropout_rate=0.0,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):  # seed the initialisation without touching the caller's RNG
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    return T5TextEncoder(tokenizer, model.to(dtype), max_length=max_length)


def tiny_opensora_pipeline(*, seed: int = 0, dtype: torch.dtype = torch.float32) -> OpenSoraPipeline:
    """Random toy models of the real architecture (STDiT3 depth 2 × width 64; a VAE of the same
    structure with 8× spatial and 4× temporal compression; a byte-level T5), the same in every process."""
    text = tiny_t5_text_encoder(seed=seed, dtype=dtype)
    config = STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=text.hidden_size)
    vae_config = OpenSoraVAEConfig(
        spatial=dict(
            in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[8, 8, 16, 16], layers_per_block=1,
            down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=4,
        ),
        temporal=TemporalVAEConfig(filters=8, num_res_blocks=1, num_groups=4),
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer, vae = STDiT3(config).eval(), OpenSoraVAE(vae_config).eval()
        with torch.no_grad():  # no zero-initialised gate or projection: every path contributes
            for p in [*transformer.parameters(), *vae.parameters()]:
                if p is not transformer.rope.freqs:
                    p.add_(torch.randn_like(p) * 0.02)
    return OpenSoraPipeline(transformer.to(dtype), vae.to(dtype), text)
