"""FLUX in parallel: ``parallelize_flux`` turns one diffusers ``FluxTransformer2DModel`` instance parallel.

At the model boundary each rank takes its sequence chunk of the image tokens and their position
ids (``shard_sequence`` order), and either its chunk of the text tokens (``text="shard"``, the
default: no rank repeats text work) or all of them (``text="replicate"``); on a ``batch`` axis it
also takes its samples. The model's own rotary embedding is then built from this rank's ids, so
it covers exactly this rank's tokens. Every attention module gets a
:class:`~models.flux.processor.FluxSequenceParallelProcessor`; everything else in FLUX is per
token or per sample and runs unchanged. The output is gathered, so callers see the single-GPU
interface and shapes. Only this instance changes: its processors and a hook on its ``forward``
(``xdit_core.hooks``: ``"xdit.flux"``; ``cuda_graph=True`` adds ``"xdit.cuda_graph"`` around it,
the pipeline's true-CFG pairing ``"xdit.cfg_pair"``); no class is touched.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from models.flux.processor import FluxSequenceParallelProcessor, JointLayout
from models.tensor_parallel import TensorParallel, apply_tp, block_plan, check_degree, degrees_for, remove_tp
from xdit_core.agreement import agreed, input_signature
from xdit_core.context import CallContext
from xdit_core.graphs import apply_cuda_graph, remove_cuda_graph
from xdit_core.hooks import Hook, get_hook, install_hook, remove_hook
from xdit_core.mesh import ParallelMesh
from xdit_core.plan import Gather, Placement, Plan, Replicate, Split, gather, split

Tensor = torch.Tensor
TEXT_MODES = ("shard", "replicate")
BOUNDARY_HOOK = "xdit.flux"  # the hook that makes a transformer parallel (its presence marks one)
CFG_HOOK = "xdit.cfg_pair"
_DEFAULT_PROCESSORS = {"FluxAttnProcessor", "FluxAttnProcessor2_0"}

# Inputs with one entry per sample (a leading dim of the batch's size; shared ones pass through).
_PER_SAMPLE = ("hidden_states", "encoder_hidden_states", "pooled_projections", "timestep", "guidance")
_CONTROLNET = ("controlnet_block_samples", "controlnet_single_block_samples")  # lists of [B, image tokens, C]


def flux_plan(text: str) -> Plan:
    """FLUX's boundary: samples over ``batch``; image tokens (and their ids, ControlNet residuals)
    over ``sp``; text tokens over ``sp`` too (``text="shard"``) or whole on every rank
    (``"replicate"``: joint tokens); the output sample gathered back over both."""
    if text == "shard":
        text_entries: tuple[Split | Replicate, ...] = (
            Split("encoder_hidden_states", 1, "sp"),
            Split("txt_ids", 0, "sp"),
        )
    else:
        text_entries = (Replicate("encoder_hidden_states", "sp"), Replicate("txt_ids", "sp"))
    return Plan(
        "parallel FLUX",
        inputs=(
            *(Split(name, 0, "batch", per_sample=True) for name in (*_PER_SAMPLE, *_CONTROLNET)),
            Split("hidden_states", 1, "sp"),
            Split("img_ids", 0, "sp"),
            *text_entries,
            *(Split(name, 1, "sp") for name in _CONTROLNET),
        ),
        outputs=(Gather("sample", 1, "sp", like="hidden_states"), Gather("sample", 0, "batch", like="hidden_states")),
        batch="hidden_states",
    )


FLUX_PLANS = {text: flux_plan(text) for text in TEXT_MODES}


@dataclass
class CfgPair:
    """True CFG on the batch axis: the cond and uncond calls of one step computed as one batch.

    Set on a parallel transformer (:func:`pair_cfg_calls`) while a pipeline runs that calls it
    twice per step, cond then uncond, on latents of the same values (the same tensor, a copy or a cast
    of it equal to it). The cond call computes the batch
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
    processors: dict[str, Any]  # the originals, restored by unparallelize_flux
    context: CallContext[JointLayout]  # the call's token layout, read by the processors
    tensor_parallel: TensorParallel | None = None  # the split Linears, when the mesh has a tp axis

    @property
    def plan(self) -> Plan:
        return FLUX_PLANS[self.text]


# Which Linears tensor parallelism splits (the same as diffusers' FluxTransformer2DModel._tp_plan): the
# attention projections and MLPs column-wise (each rank its heads, its share of the MLP), their output
# projections row-wise (partial sums all-reduced). Modulation (AdaLN), QK-norms, embeddings and the
# output layer stay whole on every rank: modulation indexes the full hidden dim.
_DOUBLE_TP = {
    **dict.fromkeys(("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj"), "colwise"),
    **dict.fromkeys(("attn.add_v_proj", "ff.net.0.proj", "ff_context.net.0.proj"), "colwise"),
    **dict.fromkeys(("attn.to_out.0", "attn.to_add_out", "ff.net.2", "ff_context.net.2"), "rowwise"),
}
_SINGLE_TP = {
    **dict.fromkeys(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "colwise"),
    "proj_out": "rowwise",  # its input is [attention heads; MLP]: both column-split, so packed
}


def flux_tp_degrees(transformer: FluxTransformer2DModel) -> list[int]:
    """The tensor-parallel degrees ``transformer`` can be split over: each rank whole heads and an equal share
    of every MLP."""
    widths = [block.proj_mlp.out_features for block in transformer.single_transformer_blocks]
    widths += [block.ff.net[0].proj.out_features for block in transformer.transformer_blocks]
    return degrees_for(transformer.config.num_attention_heads, widths)  # whole heads: the hidden dim divides too


def _flux_tp_plan(transformer: FluxTransformer2DModel, tp: int, what: str) -> tuple[dict, dict]:
    """The plan (path -> style) and the packed Linears (path -> stream widths), checked against the model."""
    check_degree(tp, flux_tp_degrees(transformer), what, f"FLUX's {transformer.config.num_attention_heads} heads")
    plan = block_plan(transformer, ("transformer_blocks",), _DOUBLE_TP, what)
    plan |= block_plan(transformer, ("single_transformer_blocks",), _SINGLE_TP, what)
    packed = {}
    for i, block in enumerate(transformer.single_transformer_blocks):
        mlp = block.mlp_hidden_dim
        packed[f"single_transformer_blocks.{i}.proj_out"] = (block.proj_out.in_features - mlp, mlp)
    return plan, packed


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

    A mesh with a ``tp`` axis (``ParallelMesh.build(tp=...)``) also splits the weights: the attention
    projections and MLPs of every block over the ``tp`` ranks with torch's ``parallelize_module``
    (each rank its share of the heads, whose attention runs on the sequence-parallel axes as usual);
    the degree must divide the heads and MLP widths (:func:`flux_tp_degrees`).
    """
    processors = _check_flux(transformer, mesh, text, "parallelize_flux")
    context = CallContext("parallel FLUX", JointLayout)
    state = _FluxState(mesh=mesh, text=text, processors=processors, context=context)
    if mesh.tp_size > 1:
        plan, packed = _flux_tp_plan(transformer, mesh.tp_size, "parallelize_flux")
        state.tensor_parallel = apply_tp(transformer, mesh, plan, packed)
    transformer.set_attn_processor(FluxSequenceParallelProcessor(mesh, context, backend=backend))
    install_hook(transformer, BOUNDARY_HOOK, _Boundary(state, inspect.signature(transformer.forward)))
    if cuda_graph:
        apply_cuda_graph(transformer)
    return transformer


def _check_flux(transformer: Any, mesh: Any, text: Any, what: str) -> dict[str, Any]:
    """The attention processors of a FLUX transformer ``what`` may make parallel on ``mesh``; else a ``ValueError``."""
    if not isinstance(transformer, FluxTransformer2DModel):
        raise ValueError(f"{what} needs a diffusers FluxTransformer2DModel, got {type(transformer).__name__}")
    if get_hook(transformer, BOUNDARY_HOOK) is not None:
        raise ValueError(f"{what}: this transformer is already parallel (unparallelize_flux it first)")
    if text not in TEXT_MODES:
        raise ValueError(f"{what}: text must be one of {TEXT_MODES}, got {text!r}")
    if not isinstance(mesh, ParallelMesh):
        raise ValueError(f"{what} needs a ParallelMesh, got {type(mesh).__name__}")
    processors = transformer.attn_processors
    foreign = sorted({type(p).__name__ for p in processors.values()} - _DEFAULT_PROCESSORS)
    if foreign:
        raise ValueError(
            f"{what} supports FLUX's default attention processor only; this transformer uses {foreign} "
            "(IP-Adapter and custom processors are not supported)"
        )
    return processors


def unparallelize_flux(transformer: FluxTransformer2DModel) -> FluxTransformer2DModel:
    """Undo :func:`parallelize_flux` (and a CUDA graph or CFG pairing on it): the original processors
    and ``forward``; returns the same instance."""
    boundary = get_hook(transformer, BOUNDARY_HOOK)
    if not isinstance(boundary, _Boundary):
        raise ValueError("unparallelize_flux: this transformer is not parallel")
    remove_hook(transformer, CFG_HOOK)
    remove_cuda_graph(transformer)  # its graphs hold the parallel call
    boundary.release(transformer)
    if boundary.state.tensor_parallel is not None:
        remove_tp(transformer, boundary.state.tensor_parallel)
    transformer.set_attn_processor(boundary.state.processors)
    remove_hook(transformer, BOUNDARY_HOOK)
    return transformer


class _Boundary(Hook):
    """The model boundary: shard the call's inputs over the mesh, run the model, gather the output."""

    exact = True  # False: the displaced mode (models/flux/displaced.py), which step caching refuses

    def __init__(self, state: _FluxState, signature: inspect.Signature) -> None:
        self.state = state
        self.signature = signature

    def call(self, module: torch.nn.Module, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return _parallel_call(inner, self.state, dict(self.signature.bind(*args, **kwargs).arguments))

    def release(self, module: torch.nn.Module) -> None:
        """Let go of what the boundary holds besides its hook and processors, before they are removed (nothing
        here; the displaced mode's boundary waits for its exchanges in flight)."""

    def end_pipeline_call(self, *, failed: bool) -> None:
        """A pipeline call (a whole sampling run) ended: drop per-run state (nothing here; the displaced
        mode's stale k/v). ``failed``: it raised, so the ranks may not all have sent their exchanges."""


@dataclass(frozen=True)
class CfgBranches:
    """The two branches a paired call computes as one batch: ``batch`` samples each, cond first."""

    batch: int
    names: tuple[str, str] = ("cond", "uncond")


class _CfgPairing(Hook):
    """True CFG on the batch axis (:class:`CfgPair`), outside the boundary (and a CUDA graph)."""

    def __init__(self, pair: CfgPair, signature: inspect.Signature) -> None:
        self.pair = pair
        self.signature = signature
        self.branches = CallContext("true-CFG pairing", CfgBranches)  # set while a paired call runs

    def call(self, module: torch.nn.Module, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        call = dict(self.signature.bind(*args, **kwargs).arguments)
        batch = call["hidden_states"].shape[0]

        def paired(c: dict[str, Any]) -> Any:
            with self.branches.entered(CfgBranches(batch)):
                return inner(**c)

        return _cfg_step(self.pair, call, paired)


def cfg_branches(transformer: FluxTransformer2DModel) -> CfgBranches | None:
    """The branches of the true-CFG paired call in progress on ``transformer`` (``None``: no paired call)."""
    pairing = get_hook(transformer, CFG_HOOK)
    if not isinstance(pairing, _CfgPairing) or not pairing.branches.active:
        return None
    return pairing.branches.layout


def pair_cfg_calls(transformer: FluxTransformer2DModel, pair: CfgPair | None) -> None:
    """Start (``pair``) or stop (``None``) computing true-CFG call pairs on the batch axis (a hook
    named ``"xdit.cfg_pair"``, outermost)."""
    boundary = get_hook(transformer, BOUNDARY_HOOK)
    if not isinstance(boundary, _Boundary):
        raise ValueError("pair_cfg_calls: the transformer is not parallel")
    remove_hook(transformer, CFG_HOOK)
    if pair is None:
        return
    if boundary.state.mesh.batch_size == 1:
        raise ValueError("pair_cfg_calls: the mesh has no batch axis to split the CFG pair over")
    install_hook(transformer, CFG_HOOK, _CfgPairing(pair, inspect.signature(transformer.forward)))


def _ids(ids: Tensor, name: str) -> Tensor:
    if ids.dim() == 3:  # diffusers' deprecated batched ids: every sample has the same ids
        ids = ids[0]
    if ids.dim() != 2:
        raise ValueError(f"parallel FLUX: {name} must be [tokens, 3], got {tuple(ids.shape)}")
    return ids


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
    if "ip_adapter_image_embeds" in (call.get("joint_attention_kwargs") or {}):
        raise ValueError("parallel FLUX: IP-Adapter inputs are not supported")
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
    """Split ``call``'s inputs over ``state.mesh`` as the plan says, run ``inner`` on them, gather its output.

    First the ranks agree that they all make this call (same shapes and options), or all raise.
    """
    mesh = state.mesh
    img_ids, txt_ids, _, _, text_len = agreed(
        mesh.world_group,
        "parallel FLUX",
        mesh.check_ranks,
        lambda: _check_call(mesh, call),
        tuple(call),
        lambda _: tuple(input_signature(value) for value in call.values()),
    )
    local, placement = split(state.plan, mesh.groups, {**call, "img_ids": img_ids, "txt_ids": txt_ids})
    with state.context.entered(_layout(state, placement, text_len)):
        out = inner(**local)
    sample = gather(state.plan, mesh.groups, {"sample": _sample_of(out)}, placement)["sample"]
    return _with_sample(out, sample)


def _layout(state: _FluxState, placement: Placement, text_len: int) -> JointLayout:
    """The tokens each sequence-parallel rank holds after the split: what the processors attend over."""
    image_lens, samples = placement.sizes_of("hidden_states", "sp"), placement.sizes_of("hidden_states", "batch")
    if state.text == "replicate":
        return JointLayout((text_len,) * len(image_lens), image_lens, True, samples)
    return JointLayout(placement.sizes_of("encoder_hidden_states", "sp"), image_lens, False, samples)


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
        if not _same_values(hidden, latents):
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


def _same_values(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` holds ``b``'s values: the same tensor (no work), else compared (one host sync)."""
    if a is b:
        return True
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and bool(torch.equal(a, b))


def _copy_container(out: Any) -> Any:
    return tuple(out) if isinstance(out, tuple) else type(out)(sample=out.sample)
