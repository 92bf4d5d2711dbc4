"""STDiT3 in parallel: ``parallelize_stdit`` shards every frame's tokens across the sequence-parallel ranks.

Resident layout: after the position embedding, each rank keeps the tokens of its chunk of the ``S``
spatial positions, in every frame (``tensor_split`` of ``S``, chunk ``mesh.sp_rank``); on a ``batch``
axis it also keeps only its samples (the CFG pair splits there). Then

* temporal attention (over the frames at one position), cross-attention (per token, against its own
  sample's text) and everything else are local: no communication;
* spatial attention (over the positions of one frame) is the only step that needs other ranks:
  ``spatial="usp"`` (default) runs it as USP attention over the mesh (Ulysses all-to-all of q/k/v and
  the output, ring over the ring axis; any head count, any number of frames); ``spatial="dsp"``
  switches the sharded axis from positions to frames with one all-to-all of the hidden states,
  attends whole frames locally, and switches back (half the bytes of Ulysses, no head-count
  constraint; needs at least one latent frame per rank). USP is the default because it measured
  faster (2×H200, 720p 4 s: 1399 ms against 1440 ms per step) and fits every frame count.

The final layer runs on the local tokens; the patches are gathered, then unpatchified, so every rank
returns the full output. Only this instance changes: its processors and three hooks. ``"xdit.stdit"``
on ``forward`` splits the samples and calls the model's own forward; inside it ``"xdit.stdit.tokens"``
on ``prepare`` splits the tokens it returns and ``"xdit.stdit.patches"`` on ``unpatchify`` gathers
the patches, all three applying ``STDIT_PLAN``. Hooks installed on ``forward`` inside the boundary
(a step cache enabled before parallelizing) therefore see the call, as on one process.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from attention.op import usp_attention_compilable
from models.stdit.attention import (
    Rope,
    SelfAttention,
    attend,
    from_attention_layout,
    to_attention_layout,
)
from models.stdit.model import STDiT3
from models.tensor_parallel import TensorParallel, apply_tp, block_plan, check_degree, degrees_for, remove_tp
from xdit_core.agreement import agreed, input_signature
from xdit_core.collectives import all_to_all, split_sizes
from xdit_core.context import CallContext
from xdit_core.hooks import Hook, get_hook, install_hook, remove_hook
from xdit_core.mesh import ParallelMesh
from xdit_core.plan import Gather, Placement, Plan, Split, gather, split

Tensor = torch.Tensor
SPATIAL_MODES = ("usp", "dsp")
BOUNDARY_HOOK = "xdit.stdit"  # the hook that makes a model parallel (its presence marks one)
TOKENS_HOOK, PATCHES_HOOK = "xdit.stdit.tokens", "xdit.stdit.patches"

_PER_SAMPLE = ("x", "timestep", "y", "mask", "x_mask", "fps", "height", "width")  # forward's arguments
# STDiT3's boundary: the inputs' samples over ``batch``; inside, the tokens ``[B, T, S, C]`` that
# ``prepare`` makes (position embedding added) over ``sp`` by spatial position; the per-token
# patches ``[B, T, S, P]`` of the final layer gathered back over both.
STDIT_PLAN = Plan(
    "parallel STDiT3",
    inputs=(
        *(Split(name, 0, "batch", per_sample=True) for name in _PER_SAMPLE),
        Split("tokens", 2, "sp"),
    ),
    outputs=(Gather("patches", 2, "sp", like="tokens"), Gather("patches", 0, "batch", like="x")),
    batch="x",
)


@dataclass(frozen=True)
class SpatialLayout:
    """Every sequence-parallel rank's spatial positions and frames, in ``sp_rank`` order; every batch
    rank's samples."""

    positions: tuple[int, ...]
    frames: tuple[int, ...]
    samples: tuple[int, ...]


class UspSpatialAttention:
    """Spatial attention over the positions of each frame, sharded by position: USP over the mesh."""

    def __init__(self, mesh: ParallelMesh, context: CallContext[SpatialLayout], backend: str) -> None:
        self.mesh, self.context, self.backend = mesh, context, backend

    def __call__(self, attn: SelfAttention, x: Tensor, *, frames: int, rope: Rope | None) -> Tensor:
        seq = to_attention_layout(x, frames, "spatial")  # [(B T), S_local, C]
        q, k, v = attn.project_qkv(seq, rope)
        positions = list(self.context.layout.positions)
        out = usp_attention_compilable(q, k, v, self.mesh, seq_len=positions, backend=self.backend)
        return attn.proj(from_attention_layout(out.flatten(2), x.shape[0], "spatial"))


class DspSpatialAttention:
    """Spatial attention with the sharded axis switched from positions to frames around it (DSP)."""

    def __init__(self, mesh: ParallelMesh, context: CallContext[SpatialLayout], backend: str) -> None:
        self.mesh, self.context, self.backend = mesh, context, backend

    def __call__(self, attn: SelfAttention, x: Tensor, *, frames: int, rope: Rope | None) -> Tensor:
        group, layout = self.mesh.sp_group, self.context.layout
        grid = x.unflatten(1, (frames, -1))  # [B, T, S_local, C]
        frames_sizes, position_sizes = list(layout.frames), list(layout.positions)
        (whole,) = all_to_all(
            [grid], group, scatter_dim=1, gather_dim=2, scatter_sizes=frames_sizes, gather_sizes=position_sizes
        )  # [B, T_local, S, C]: whole frames
        seq = whole.flatten(0, 1)
        out = attn.proj(attend(*attn.project_qkv(seq, rope), self.backend).flatten(2)).unflatten(0, whole.shape[:2])
        (back,) = all_to_all(
            [out], group, scatter_dim=2, gather_dim=1, scatter_sizes=position_sizes, gather_sizes=frames_sizes
        )
        return back.flatten(1, 2)


def _check_call(model: STDiT3, state: _StditState, call: dict[str, Any]) -> tuple[int, int, Any]:
    """``(frames, positions per frame, grid)`` of a valid call on ``state.mesh``; a ``ValueError`` otherwise."""
    mesh = state.mesh
    x = call["x"]
    model.check_inputs(x, call["timestep"], call["y"], call.get("mask"), call.get("x_mask"))
    batch = x.shape[0]
    grid = model.grid(x)
    frames, positions = grid.tokens[0], grid.positions
    if positions < mesh.sp_size:
        raise ValueError(
            f"parallel STDiT3: {positions} spatial positions per frame cannot be shared by {mesh.sp_size} "
            f"sequence-parallel ranks (mesh {mesh.describe()}): use at most {positions} or larger latents"
        )
    if batch < mesh.batch_size:
        raise ValueError(
            f"parallel STDiT3: a batch of {batch} cannot be split over the batch axis of {mesh.batch_size} "
            "(the CFG pair, or more prompts, fill it)"
        )
    if state.spatial == "dsp" and mesh.sp_size > 1 and frames < mesh.sp_size:
        raise ValueError(
            f"parallel STDiT3: spatial='dsp' needs at least one latent frame per sequence-parallel rank "
            f"({frames} frames, {mesh.sp_size} ranks): use spatial='usp'"
        )
    return frames, positions, grid


@dataclass
class _StditState:
    mesh: ParallelMesh
    spatial: str
    processors: dict[int, Any]  # the originals, restored by unparallelize_stdit
    context: CallContext[SpatialLayout]  # the call's positions and frames per rank, read by the processors
    placement: CallContext[Placement]  # the call's split, read by the tokens and patches hooks
    tensor_parallel: TensorParallel | None = None  # the split Linears, when the mesh has a tp axis


# Tensor parallelism: each block's attention projections and MLP split over the tp ranks (each rank its
# heads); the fused qkv and kv Linears are packed (their output is [q; k; v], [k; v]). Modulation tables,
# norms, embedders and the final layer stay whole on every rank.
_BLOCK_TP = {
    "attn.qkv": "colwise", "attn.proj": "rowwise", "cross_attn.q_linear": "colwise",
    "cross_attn.kv_linear": "colwise", "cross_attn.proj": "rowwise", "mlp.fc1": "colwise", "mlp.fc2": "rowwise",
}  # fmt: skip


def stdit_tp_degrees(model: STDiT3) -> list[int]:
    """The tensor-parallel degrees ``model`` can be split over: each rank whole heads and an equal MLP share."""
    widths = [block.mlp.fc1.out_features for block in (*model.spatial_blocks, *model.temporal_blocks)]
    return degrees_for(model.config.num_heads, widths)


def _stdit_tp_plan(model: STDiT3, tp: int) -> tuple[dict[str, str], dict[str, tuple[int, ...]]]:
    what = "parallelize_stdit"
    check_degree(tp, stdit_tp_degrees(model), what, f"STDiT3's {model.config.num_heads} heads")
    lists = ("spatial_blocks", "temporal_blocks")
    plan, dim = block_plan(model, lists, _BLOCK_TP, what), model.config.hidden_size
    packed = {path: (dim,) * (3 if path.endswith("qkv") else 2) for path in plan if path.endswith(("qkv", "kv_linear"))}
    return plan, packed


def parallelize_stdit(model: STDiT3, mesh: ParallelMesh, *, spatial: str = "usp", backend: str = "auto") -> STDiT3:
    """Make ``model`` compute in parallel on ``mesh``; returns the same instance.

    Call it as before on every rank with the same full inputs; every rank gets the full output.
    ``spatial``: ``"usp"`` (default) or ``"dsp"`` (see the module docstring). ``backend``: the kernel
    of the sharded spatial attention (USP's or DSP's).
    """
    if not isinstance(model, STDiT3):
        raise ValueError(f"parallelize_stdit needs an STDiT3, got {type(model).__name__}")
    if get_hook(model, BOUNDARY_HOOK) is not None:
        raise ValueError("parallelize_stdit: this model is already parallel (unparallelize_stdit it first)")
    if not isinstance(mesh, ParallelMesh):
        raise ValueError(f"parallelize_stdit needs a ParallelMesh, got {type(mesh).__name__}")
    plan = _stdit_tp_plan(model, mesh.tp_size) if mesh.tp_size > 1 else None
    if spatial not in SPATIAL_MODES:
        raise ValueError(f"parallelize_stdit: spatial must be one of {SPATIAL_MODES}, got {spatial!r}")
    spatial_attn = [block.attn for block in model.spatial_blocks]
    foreign = sorted({type(a.processor).__name__ for a in spatial_attn} - {"LocalSelfAttention"})
    if foreign:
        raise ValueError(f"parallelize_stdit: the spatial attention has custom processors {foreign}")
    context = CallContext("parallel STDiT3", SpatialLayout)
    placement = CallContext("parallel STDiT3", Placement)
    state = _StditState(mesh, spatial, {id(a): a.processor for a in spatial_attn}, context, placement)
    if plan is not None:
        state.tensor_parallel = apply_tp(model, mesh, *plan)
    if mesh.sp_size > 1:  # on a batch-only mesh every rank holds whole frames: the plain attention stays
        processor = (UspSpatialAttention if spatial == "usp" else DspSpatialAttention)(mesh, context, backend)
        for attn in spatial_attn:
            attn.processor = processor
    install_hook(model, TOKENS_HOOK, _Tokens(state), method="prepare")
    install_hook(model, PATCHES_HOOK, _Patches(state), method="unpatchify")
    install_hook(model, BOUNDARY_HOOK, _Boundary(model, state, inspect.signature(model.forward)))
    return model


def unparallelize_stdit(model: STDiT3) -> STDiT3:
    """Undo :func:`parallelize_stdit`: the original processors and ``forward``; returns the same instance."""
    boundary = get_hook(model, BOUNDARY_HOOK)
    if not isinstance(boundary, _Boundary):
        raise ValueError("unparallelize_stdit: this model is not parallel")
    for block in model.spatial_blocks:
        block.attn.processor = boundary.state.processors[id(block.attn)]
    if boundary.state.tensor_parallel is not None:
        remove_tp(model, boundary.state.tensor_parallel)
    remove_hook(model, BOUNDARY_HOOK)
    remove_hook(model, TOKENS_HOOK, method="prepare")
    remove_hook(model, PATCHES_HOOK, method="unpatchify")
    return model


class _Boundary(Hook):
    """The model boundary: agree on the call, split its samples, run the model's own forward on them."""

    def __init__(self, model: STDiT3, state: _StditState, signature: inspect.Signature) -> None:
        self.model = model
        self.state = state
        self.signature = signature

    def call(self, module: torch.nn.Module, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Tensor:
        state, call = self.state, dict(self.signature.bind(*args, **kwargs).arguments)
        mesh = state.mesh
        frames, positions, _ = agreed(
            mesh.world_group,
            "parallel STDiT3",
            mesh.check_ranks,
            lambda: _check_call(self.model, state, call),
            tuple(call),
            lambda _: tuple(input_signature(value) for value in call.values()),
        )
        local, placement = split(STDIT_PLAN, mesh.groups, call)  # this rank's samples
        sizes = tuple(split_sizes(positions, mesh.sp_size)), tuple(split_sizes(frames, mesh.sp_size))
        layout = SpatialLayout(*sizes, placement.sizes_of("x", "batch"))
        with state.placement.entered(placement), state.context.entered(layout):
            return inner(**local)


class _Tokens(Hook):
    """After ``prepare`` (position embedding added on the whole grid): this rank's positions of the tokens."""

    def __init__(self, state: _StditState) -> None:
        self.state = state

    def post(self, module: torch.nn.Module, out: Any) -> Any:
        tokens, cond, grid = out  # tokens [B_local, T, S, C]
        placement = self.state.placement.layout
        tokens = split(STDIT_PLAN, self.state.mesh.groups, {"tokens": tokens}, placement)[0]["tokens"]
        return tokens, cond, grid


class _Patches(Hook):
    """Before ``unpatchify``: every rank's patches ``[B_local, T·S_local, P]`` gathered to the whole batch and grid."""

    def __init__(self, state: _StditState) -> None:
        self.state = state

    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        patches, grid = args
        frames = grid.tokens[0]
        placement = self.state.placement.layout
        local = {"patches": patches.unflatten(1, (frames, -1))}  # [B_local, T, S_local, P]
        whole = gather(STDIT_PLAN, self.state.mesh.groups, local, placement)["patches"]
        return (whole.flatten(1, 2), grid), kwargs
