"""A stock diffusers ``FluxPipeline`` generating in parallel, and a tiny random one for CPUs.

:func:`parallelize_flux_pipeline` parallelizes the pipeline's transformer and returns a
:class:`ParallelFluxPipeline` that is called like the pipeline on every rank. Around the stock
call it makes the parallel parts agree: world rank 0 encodes the prompts (the other ranks may
have no text encoders) and every rank receives the embeddings; rank 0 draws the initial latents
from the caller's generator and every rank starts from them; with true CFG on a mesh with a
``batch`` axis, the cond and uncond passes of each step run as one batch split over that axis.
The VAE decodes across every rank (row bands, ``parallel_vae``). Every rank gets the images
(saving them is the caller's choice, usually on rank 0).
"""

from __future__ import annotations

import tempfile
from typing import Any

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

from models.flux import CfgPair, pair_cfg_calls, parallelize_flux, unparallelize_flux
from parallel_vae import is_parallel_vae, parallelize_vae, unparallelize_vae
from xdit_core.collectives import broadcast_tensors
from xdit_core.mesh import ParallelMesh


class ParallelFluxPipeline:
    """A ``FluxPipeline`` whose transformer runs on ``mesh``; call it as the pipeline, on every rank."""

    def __init__(self, pipe: FluxPipeline, mesh: ParallelMesh) -> None:
        self.pipe = pipe
        self.mesh = mesh

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        *,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        **kwargs: Any,
    ) -> Any:
        """Generate as ``FluxPipeline.__call__`` does; takes its other keyword arguments as they are.

        ``prompt`` and ``generator`` matter on world rank 0 only (it encodes and draws the latents).
        """
        embed_names = (
            "prompt_embeds",
            "pooled_prompt_embeds",
            "negative_prompt_embeds",
            "negative_pooled_prompt_embeds",
        )
        for name in embed_names:
            if kwargs.get(name) is not None:
                raise ValueError(f"ParallelFluxPipeline encodes the prompts itself: pass prompts, not {name}")
        pipe, world = self.pipe, dist.group.WORLD
        device = pipe._execution_device
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        true_cfg = true_cfg_scale > 1 and negative_prompt is not None
        if prompt is None:
            raise ValueError("ParallelFluxPipeline: pass the prompt (on every rank; rank 0 encodes it)")
        sent, failure = None, None
        if world.rank() == 0:
            try:
                sent = self._encode_and_draw(
                    prompt,
                    prompt_2,
                    negative_prompt if true_cfg else None,
                    negative_prompt_2,
                    num_images_per_prompt,
                    max_sequence_length,
                    height,
                    width,
                    generator,
                    latents,
                )
            except Exception as e:  # the other ranks must learn of it, not wait for tensors that never come
                failure = e
        status = [None if failure is None else f"{type(failure).__name__}: {failure}"]
        dist.broadcast_object_list(status, group=world, group_src=0, device=device)
        if failure is not None:
            raise failure
        if status[0] is not None:
            raise RuntimeError(f"rank 0 could not encode the prompt or draw the latents: {status[0]}")
        received = broadcast_tensors(sent, world, src=0, device=device)
        embeds, pooled = received[:2]
        call = dict(
            kwargs,
            height=height,
            width=width,
            latents=received[-1],
            max_sequence_length=max_sequence_length,
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
        )
        true_cfg = len(received) == 7  # rank 0 sent the negative prompt's embeddings too
        if true_cfg:
            call.update(
                negative_prompt_embeds=received[3],
                negative_pooled_prompt_embeds=received[4],
                true_cfg_scale=true_cfg_scale,
            )
        pair = self.mesh.batch_size > 1 and true_cfg
        if pair:
            pair_cfg_calls(pipe.transformer, CfgPair(received[3], received[4], received[5]))
        try:
            return pipe(**call)
        finally:
            if pair:
                pair_cfg_calls(pipe.transformer, None)

    def _encode_and_draw(
        self,
        prompt: str | list[str],
        prompt_2: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_2: str | list[str] | None,
        num_images_per_prompt: int,
        max_sequence_length: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> list[torch.Tensor]:
        """Rank 0's part: the prompt's (and negative prompt's) embeddings and text ids, then the latents."""
        pipe = self.pipe
        device = pipe._execution_device
        encode = dict(
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length
        )
        sent = list(pipe.encode_prompt(prompt, prompt_2, **encode))
        if negative_prompt is not None:
            sent += pipe.encode_prompt(negative_prompt, negative_prompt_2, **encode)
        channels = pipe.transformer.config.in_channels // 4
        batch, dtype = sent[0].shape[0], sent[0].dtype
        drawn, _ = pipe.prepare_latents(batch, channels, height, width, dtype, device, generator, latents)
        return [*sent, drawn]


def parallelize_flux_pipeline(
    pipe: FluxPipeline,
    mesh: ParallelMesh,
    *,
    text: str = "shard",
    backend: str = "auto",
    cuda_graph: bool = False,
    vae: bool = True,
    vae_tile_rows: int | None = None,
) -> ParallelFluxPipeline:
    """Parallelize ``pipe.transformer`` on ``mesh`` (see :func:`~models.flux.parallelize_flux`) and wrap ``pipe``.

    ``vae``: also decode across every rank of the mesh (:func:`~parallel_vae.parallelize_vae`,
    row bands, exact; ``vae_tile_rows`` caps its slabs); ``False`` leaves the VAE as it is.
    """
    if not isinstance(pipe, FluxPipeline):
        raise ValueError(f"parallelize_flux_pipeline needs a diffusers FluxPipeline, got {type(pipe).__name__}")
    if vae:
        parallelize_vae(pipe.vae, mesh, tile_rows=vae_tile_rows)
    try:
        parallelize_flux(pipe.transformer, mesh, text=text, backend=backend, cuda_graph=cuda_graph)
    except Exception:
        if vae:
            unparallelize_vae(pipe.vae)
        raise
    return ParallelFluxPipeline(pipe, mesh)


def unparallelize_flux_pipeline(parallel: ParallelFluxPipeline) -> FluxPipeline:
    """The plain pipeline back, its transformer (and VAE, if it was parallelized) restored."""
    unparallelize_flux(parallel.pipe.transformer)
    if is_parallel_vae(parallel.pipe.vae):
        unparallelize_vae(parallel.pipe.vae)
    return parallel.pipe


# ---- a tiny random FLUX pipeline: the whole path on a CPU in seconds ----

_WORDS = (
    "a an the of and in on with at by from to photo painting picture image portrait landscape city street forest "
    "mountain river sea sky sun moon night day cat dog bird horse fish tree flower house car boat red green blue "
    "yellow black white golden small large old young bright dark beautiful detailed high quality sharp blurry"
).split()


def _word_tokenizer(special: dict[str, str], max_length: int) -> Any:
    """A whitespace word-level tokenizer over a small vocabulary (unknown words map to the unk token)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = list(dict.fromkeys(special.values()))
    vocab = {w: i for i, w in enumerate(names + _WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=special["unk_token"]))
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
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

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
    tokenizer = _word_tokenizer(clip_special, 77)
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
    tokenizer_2 = _word_tokenizer(dict(unk_token="<unk>", eos_token="</s>", pad_token="<pad>"), 128)
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
