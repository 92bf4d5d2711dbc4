"""FLUX in parallel: ``parallelize_flux`` turns one diffusers ``FluxTransformer2DModel`` instance parallel.

At the model boundary each rank takes its sequence chunk of the image tokens and their position
ids (``shard_sequence`` order), and either its chunk of the text tokens (``text="shard"``, the
default: no rank repeats text work) or all of them (``text="replicate"``); on a ``batch`` axis it
also takes its samples. The model's own rotary embedding is then built from this rank's ids, so
it covers exactly this rank's tokens. Every attention module gets a
:class:`~models.flux.processor.FluxSequenceParallelProcessor`; everything else in FLUX is per
token or per sample and runs unchanged. The output is gathered, so callers see the single-GPU
interface and shapes. Only this instance changes: its processors and an instance-level
``forward``; no class is touched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from models.flux.processor import FluxSequenceParallelProcessor, JointLayout
from xdit_core.agreement import agreed, input_signature
from xdit_core.collectives import gather, gather_sequence, shard, split_sizes
from xdit_core.graphs import CudaGraphed
from xdit_core.mesh import ParallelMesh

Tensor = torch.Tensor
TEXT_MODES = ("shard", "replicate")
_STATE = "_xdit_flux_parallel"  # the instance attribute that marks a parallelized transformer
_DEFAULT_PROCESSORS = {"FluxAttnProcessor", "FluxAttnProcessor2_0"}


@dataclass
class CfgPair:
    """True CFG on the batch axis: the cond and uncond calls of one step computed as one batch.

    Set on a parallel transformer (:func:`pair_cfg_calls`) while a pipeline runs that calls it
    twice per step, cond then uncond, on the same latents. The cond call computes the batch
    ``[cond; uncond]`` split over the ``batch`` axis and returns the cond half; the uncond call
    returns the other half without computing anything.
    """

    negative_prompt_embeds: Tensor
    negative_pooled_prompt_embeds: Tensor
    negative_text_ids: Tensor
    pending: tuple[Tensor, Any] | None = field(default=None, repr=False)  # (latents of the step, uncond output)


@dataclass
class _FluxState:
    mesh: ParallelMesh
    text: str
    processors: dict[str, Any]
    previous_forward: Callable[..., Any] | None
    cfg: CfgPair | None = None


def parallelize_flux(
    transformer: FluxTransformer2DModel,
    mesh: ParallelMesh,
    *,
    text: str = "shard",
    backend: str = "auto",
    cuda_graph: bool = False,
) -> FluxTransformer2DModel:
    """Make ``transformer`` compute in parallel on ``mesh``; returns the same instance.

    ``text``: ``"shard"`` (text tokens split like image tokens; default, the cheaper exact choice)
    or ``"replicate"`` (every rank holds all text tokens; they join attention as joint tokens).
    ``backend``: the attention kernel (see ``attention.available_backends``). ``cuda_graph``:
    replay each input signature's forward (collectives included) from a CUDA graph captured on
    its first call (:class:`~xdit_core.graphs.CudaGraphed`; inference on CUDA only, other calls
    run eagerly); it removes the CPU cost of issuing a step, which dominates small images on
    several GPUs. Call the model as before on every rank with the same full inputs; every rank
    gets the full output.
    """
    if not isinstance(transformer, FluxTransformer2DModel):
        raise ValueError(f"parallelize_flux needs a diffusers FluxTransformer2DModel, got {type(transformer).__name__}")
    if getattr(transformer, _STATE, None) is not None:
        raise ValueError("parallelize_flux: this transformer is already parallel (unparallelize_flux it first)")
    if text not in TEXT_MODES:
        raise ValueError(f"parallelize_flux: text must be one of {TEXT_MODES}, got {text!r}")
    if not isinstance(mesh, ParallelMesh):
        raise ValueError(f"parallelize_flux needs a ParallelMesh, got {type(mesh).__name__}")
    processors = transformer.attn_processors
    foreign = sorted({type(p).__name__ for p in processors.values()} - _DEFAULT_PROCESSORS)
    if foreign:
        raise ValueError(
            f"parallelize_flux supports FLUX's default attention processor only; this transformer uses {foreign} "
            "(IP-Adapter and custom processors are not supported)"
        )
    previous = transformer.__dict__.get("forward")  # an instance-level forward another tool installed
    state = _FluxState(mesh=mesh, text=text, processors=processors, previous_forward=previous)
    transformer.set_attn_processor(FluxSequenceParallelProcessor(mesh, backend=backend))
    inner = transformer.forward
    signature = inspect.signature(inner)

    graphed = None
    if cuda_graph:
        graphed = CudaGraphed(lambda **c: _sample_of(_parallel_call(inner, state, {**c, "return_dict": False})))

    def run(call: dict[str, Any]) -> Any:
        if graphed is None:
            return _parallel_call(inner, state, call)
        return_dict = call.pop("return_dict", True)
        sample = graphed(**call)
        return Transformer2DModelOutput(sample=sample) if return_dict else (sample,)

    def forward(*args: Any, **kwargs: Any) -> Any:
        call = dict(signature.bind(*args, **kwargs).arguments)
        return run(call) if state.cfg is None else _cfg_step(state.cfg, call, run)

    transformer.forward = forward
    setattr(transformer, _STATE, state)
    return transformer


def unparallelize_flux(transformer: FluxTransformer2DModel) -> FluxTransformer2DModel:
    """Undo :func:`parallelize_flux`: the original processors and ``forward``; returns the same instance."""
    state: _FluxState | None = getattr(transformer, _STATE, None)
    if state is None:
        raise ValueError("unparallelize_flux: this transformer is not parallel")
    transformer.set_attn_processor(state.processors)
    if state.previous_forward is None:
        del transformer.forward
    else:
        transformer.forward = state.previous_forward
    delattr(transformer, _STATE)
    return transformer


def pair_cfg_calls(transformer: FluxTransformer2DModel, pair: CfgPair | None) -> None:
    """Start (``pair``) or stop (``None``) computing true-CFG call pairs on the batch axis."""
    state: _FluxState | None = getattr(transformer, _STATE, None)
    if state is None:
        raise ValueError("pair_cfg_calls: the transformer is not parallel")
    if pair is not None and state.mesh.batch_size == 1:
        raise ValueError("pair_cfg_calls: the mesh has no batch axis to split the CFG pair over")
    state.cfg = pair


def _ids(ids: Tensor, name: str) -> Tensor:
    if ids.dim() == 3:  # diffusers' deprecated batched ids: every sample has the same ids
        ids = ids[0]
    if ids.dim() != 2:
        raise ValueError(f"parallel FLUX: {name} must be [tokens, 3], got {tuple(ids.shape)}")
    return ids


def _per_sample(x: Tensor | None, batch: int) -> bool:
    return x is not None and x.dim() >= 1 and x.shape[0] == batch and batch > 1


def _check_call(mesh: ParallelMesh, call: dict[str, Any]) -> tuple[Tensor, Tensor, int, int, int]:
    """``(img_ids, txt_ids [tokens, 3], batch, image tokens, text tokens)`` of a valid call; else a ``ValueError``."""
    hidden, context = call.get("hidden_states"), call.get("encoder_hidden_states")
    img_ids, txt_ids = call.get("img_ids"), call.get("txt_ids")
    if any(x is None for x in (hidden, context, img_ids, txt_ids)):
        raise ValueError("parallel FLUX needs hidden_states, encoder_hidden_states, img_ids and txt_ids")
    if hidden.dim() != 3 or context.dim() != 3 or context.shape[0] != hidden.shape[0]:
        raise ValueError(
            f"parallel FLUX: hidden_states {tuple(hidden.shape)} and encoder_hidden_states {tuple(context.shape)} "
            "must be [B, tokens, channels] with the same B"
        )
    img_ids, txt_ids = _ids(img_ids, "img_ids"), _ids(txt_ids, "txt_ids")
    batch, image_len, text_len = hidden.shape[0], hidden.shape[1], context.shape[1]
    if img_ids.shape[0] != image_len or txt_ids.shape[0] != text_len:
        raise ValueError(
            f"parallel FLUX: img_ids has {img_ids.shape[0]} rows for {image_len} image tokens, txt_ids "
            f"{txt_ids.shape[0]} rows for {text_len} text tokens"
        )
    if image_len < mesh.sp_size:
        raise ValueError(
            f"parallel FLUX: {image_len} image tokens cannot be shared by {mesh.sp_size} sequence-parallel ranks "
            f"(mesh {mesh.describe()}): use at most {image_len} ranks or a larger image"
        )
    if batch < mesh.batch_size:
        raise ValueError(
            f"parallel FLUX: a batch of {batch} cannot be split over the batch axis of {mesh.batch_size} "
            "(more prompts, num_images_per_prompt or true CFG fill it)"
        )
    return img_ids, txt_ids, batch, image_len, text_len


def _parallel_call(inner: Callable[..., Any], state: _FluxState, call: dict[str, Any]) -> Any:
    """Shard ``call``'s inputs over ``state.mesh``, run ``inner`` on them, gather its output.

    First the ranks agree that they all make this call (same shapes and options), or all raise.
    """
    mesh = state.mesh
    img_ids, txt_ids, batch, image_len, text_len = agreed(
        mesh.world_group,
        "parallel FLUX",
        mesh.check_ranks,
        lambda: _check_call(mesh, call),
        tuple(call),
        lambda _: tuple(input_signature(value) for value in call.values()),
    )
    local = dict(call)
    batch_sizes = split_sizes(batch, mesh.batch_size)
    for name in ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance"):
        local[name] = _my_samples(local.get(name), mesh, batch)
    local["hidden_states"] = shard(local["hidden_states"], mesh.sp_group, dim=1)
    local["img_ids"] = shard(img_ids, mesh.sp_group, dim=0)
    if state.text == "shard":
        local["encoder_hidden_states"] = shard(local["encoder_hidden_states"], mesh.sp_group, dim=1)
        local["txt_ids"] = shard(txt_ids, mesh.sp_group, dim=0)
        text_lens = tuple(split_sizes(text_len, mesh.sp_size))
    else:
        local["txt_ids"] = txt_ids
        text_lens = (text_len,) * mesh.sp_size
    for name in ("controlnet_block_samples", "controlnet_single_block_samples"):
        if local.get(name) is not None:  # image-token residuals [B, image tokens, C]
            local[name] = [shard(_my_samples(x, mesh, batch), mesh.sp_group, dim=1) for x in local[name]]
    kwargs = dict(local.get("joint_attention_kwargs") or {})
    if "ip_adapter_image_embeds" in kwargs:
        raise ValueError("parallel FLUX: IP-Adapter inputs are not supported")
    image_lens = split_sizes(image_len, mesh.sp_size)
    kwargs["sp_layout"] = JointLayout(text_lens, tuple(image_lens), state.text == "replicate")
    local["joint_attention_kwargs"] = kwargs
    out = inner(**local)
    sample = gather_sequence(_sample_of(out), mesh, dim=1, seq_len=image_lens)
    if mesh.batch_size > 1:
        sample = gather(sample, mesh.batch_group, dim=0, sizes=batch_sizes)
    return _with_sample(out, sample)


def _my_samples(x: Tensor | None, mesh: ParallelMesh, batch: int) -> Tensor | None:
    """This rank's samples of a per-sample input (leading dim ``batch``) on the batch axis; others as they are."""
    if mesh.batch_size > 1 and _per_sample(x, batch):
        return shard(x, mesh.batch_group, dim=0)
    return x


def _sample_of(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out.sample


def _with_sample(out: Any, sample: Tensor) -> Any:
    if isinstance(out, tuple):
        return (sample, *out[1:])
    out.sample = sample
    return out


def _cfg_step(pair: CfgPair, call: dict[str, Any], run: Callable[[dict[str, Any]], Any]) -> Any:
    """One call of a true-CFG pair (see :class:`CfgPair`)."""
    hidden = call["hidden_states"]
    if pair.pending is not None:  # the uncond call: its result was computed with the cond call
        latents, out = pair.pending
        if hidden is not latents:
            raise RuntimeError(
                "true-CFG pairing: the call after the cond call must be the uncond call on the same latents"
            )
        pair.pending = None
        return out
    if call.get("controlnet_block_samples") is not None or call.get("controlnet_single_block_samples") is not None:
        raise ValueError("true-CFG pairing does not take ControlNet residuals (they differ between cond and uncond)")
    batch = hidden.shape[0]
    negative = (pair.negative_prompt_embeds, pair.negative_pooled_prompt_embeds)
    if negative[0].shape != call["encoder_hidden_states"].shape:
        raise ValueError(
            f"true-CFG pairing: negative prompt embeddings {tuple(negative[0].shape)} must have the shape of the "
            f"prompt embeddings {tuple(call['encoder_hidden_states'].shape)}"
        )
    if not torch.equal(_ids(pair.negative_text_ids, "txt_ids"), _ids(call["txt_ids"], "txt_ids")):
        raise ValueError("true-CFG pairing: the negative prompt's text ids differ from the prompt's")
    paired = dict(call)
    paired["hidden_states"] = torch.cat((hidden, hidden))
    paired["encoder_hidden_states"] = torch.cat((call["encoder_hidden_states"], negative[0]))
    paired["pooled_projections"] = torch.cat((call["pooled_projections"], negative[1]))
    for name in ("timestep", "guidance"):
        x = call.get(name)
        if x is not None and x.dim() >= 1 and x.shape[0] == batch:
            paired[name] = torch.cat((x, x))
    out = run(paired)
    cond, uncond = _sample_of(out).split(batch)
    pair.pending = (hidden, _with_sample(_copy_container(out), uncond))
    return _with_sample(out, cond)


def _copy_container(out: Any) -> Any:
    return tuple(out) if isinstance(out, tuple) else type(out)(sample=out.sample)
