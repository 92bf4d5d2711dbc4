"""FLUX with displaced (stale-KV) patch parallelism: opt-in and **inexact** (``docs/displaced.md``).

:func:`parallelize_flux_displaced` shards the image tokens over the mesh's sequence-parallel ranks
with the exact adapter's plan and boundary (:mod:`models.flux.adapter`), and installs one
:class:`DisplacedFluxProcessor` per attention module. Within one sampling run of one branch:

* steps ``0 .. warmup_steps - 1``: the exact parallel attention (Ulysses × ring), bit for bit what
  :func:`~models.flux.parallelize_flux` computes on the same mesh; the last of them also sends each
  layer's image k/v to the other ranks;
* every later step: each attention layer attends with this rank's fresh k/v and the other ranks'
  k/v of the previous step (:func:`~attention.displaced.displaced_attention`), and sends its fresh
  ones for the next step while the step computes (:class:`~attention.displaced.StaleExchange`). No
  other communication in the blocks; the boundary still splits the inputs and gathers the output.

Text tokens (``text="replicate"``, the default): every rank holds all of them, and their k/v are
computed fresh on every rank and never exchanged; only image k/v are stale. After warm-up each
rank's copy of the text stream sees the image through its own mix of fresh and stale keys, so the
copies drift apart (only the image tokens leave the model). ``text="shard"``: text tokens are split
like the image tokens and exchanged with them (stale too, as in piflux); no rank repeats text work.

Runs and branches: a run starts (warm-up again, every stale buffer dropped) when a branch's
timestep does not decrease, when the call's shapes change, or after :func:`reset_flux_displaced`.
The branch of a call is diffusers' ``cache_context`` name (``FluxPipeline`` says "cond" / "uncond"
for true CFG as two calls per step) or "default"; a true-CFG pair computed as one batch on the
mesh's ``batch`` axis (:func:`~models.flux.pair_cfg_calls`) is one branch, "cond+uncond", whose
buffers hold this rank's samples. Two calls in a row at one timestep in one branch, past a run's
first step, raise a ``ValueError`` (unnamed CFG calls would otherwise share stale buffers).

Stale memory, per rank, per branch: ``L · 2 · B_local · P · ceil(N / P) · H · D`` elements in the
model's dtype, with ``L`` attention layers (57 in FLUX.1), ``P`` sequence-parallel ranks, ``N`` the
exchanged tokens (image tokens; image + text with ``text="shard"``), ``H · D`` the inner dim (3072).
FLUX.1 at 1024² in bf16 (N = 4096, B_local = 1): 57 · 2 · 4096 · 3072 · 2 bytes = 2.87 GB per branch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from attention.displaced import StaleExchange, displaced_attention
from models.caching import STEP_HOOK
from models.flux.adapter import (
    BOUNDARY_HOOK,
    _Boundary,
    _check_flux,
    _FluxState,
    _parallel_call,
    cfg_branches,
    unparallelize_flux,
)
from models.flux.processor import FluxSequenceParallelProcessor, JointLayout
from xdit_core.agreement import agree
from xdit_core.context import CallContext
from xdit_core.graphs import CUDA_GRAPH_HOOK
from xdit_core.hooks import Hook, get_hook, install_hook, remove_hook
from xdit_core.mesh import ParallelMesh

Tensor = torch.Tensor
CONTEXT_HOOK = "xdit.displaced.context"  # on cache_context: the name of the branch being called
CACHE_REFUSED = (
    "step caching does not combine with the displaced mode (a skipped block would keep its k/v exchange in "
    "flight and attend k/v older than one step: a third approximation nobody has measured)"
)
WARM_UP, LAST_WARM_UP, DISPLACED = "warm-up", "last warm-up", "displaced"  # the phases of a step


class _Run:
    """One branch's sampling run: steps done, the last timestep, the call's shapes, each layer's exchange."""

    def __init__(self, key: tuple) -> None:
        self.key = key
        self.step = 0
        self.timestep: float | None = None
        self.exchanges: dict[str, StaleExchange] = {}

    def exchange(self, layer: str, mesh: ParallelMesh) -> StaleExchange:
        if layer not in self.exchanges:
            self.exchanges[layer] = StaleExchange(mesh.sp_group)
        return self.exchanges[layer]

    def drop(self, *, wait: bool) -> None:
        for exchange in self.exchanges.values():
            exchange.drop(wait=wait)
        self.exchanges.clear()


@dataclass(frozen=True)
class DisplacedStep:
    """The call in progress: its branch's run and its phase (``"warm-up"``, ``"last warm-up"``, ``"displaced"``)."""

    run: _Run
    phase: str


@dataclass
class _DisplacedState(_FluxState):
    warmup_steps: int = 1
    step: CallContext[DisplacedStep] = field(default_factory=lambda: CallContext("displaced FLUX", DisplacedStep))
    runs: dict[str, _Run] = field(default_factory=dict)  # by branch name
    branch_name: str | None = None  # the model's cache_context in effect

    def reset(self, *, wait: bool = True) -> None:
        for run in self.runs.values():
            run.drop(wait=wait)
        self.runs.clear()


class DisplacedFluxProcessor(FluxSequenceParallelProcessor):
    """:class:`~models.flux.processor.FluxSequenceParallelProcessor` with the displaced attention after warm-up.

    One per attention module (``layer``: its name), since each keeps its own stale k/v per branch.
    """

    def __init__(
        self,
        mesh: ParallelMesh,
        context: CallContext[JointLayout],
        steps: CallContext[DisplacedStep],
        layer: str,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__(mesh, context, backend=backend)
        self.steps = steps
        self.layer = layer

    @torch.compiler.disable
    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """This rank's tokens ``[B, T + I_local, H, D]``: exact in warm-up, then fresh local k/v plus stale others'."""
        step, layout = self.steps.layout, self.context.layout
        if step.phase == WARM_UP:
            return super().attend(q, k, v)
        rank = self.mesh.sp_rank
        text_len = layout.text_lens[rank]
        if q.shape[1] != text_len + layout.image_lens[rank]:
            raise ValueError(
                f"DisplacedFluxProcessor: rank {rank} holds {q.shape[1]} tokens, but the layout says "
                f"{text_len} text + {layout.image_lens[rank]} image"
            )
        # replicated text stays on every rank, fresh; sharded text travels with the image tokens
        sent = slice(text_len, None) if layout.replicated_text else slice(None)
        lengths = layout.image_lens if layout.replicated_text else layout.local_lens
        exchange = step.run.exchange(self.layer, self.mesh)
        if step.phase == LAST_WARM_UP:
            exchange.send(k[:, sent], v[:, sent], lengths)
            return super().attend(q, k, v)
        if not exchange.in_flight:
            raise RuntimeError(
                f"displaced FLUX: {self.layer} has no k/v of the previous step (did it not run then?); "
                "reset_flux_displaced(transformer) starts a new run with warm-up"
            )
        stale = exchange.receive()
        exchange.send(k[:, sent], v[:, sent], lengths)
        return displaced_attention(q, k, v, stale, backend=self.backend)


class _DisplacedBoundary(_Boundary):
    """The exact boundary (split, run, gather), with each call placed in its branch's run and phase."""

    state: _DisplacedState
    exact = False

    def call(self, module: torch.nn.Module, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        state = self.state
        capturing = torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
        if get_hook(module, CUDA_GRAPH_HOOK) is not None or capturing:
            raise ValueError(
                "displaced FLUX: a CUDA graph cannot replay this mode (its phase, stale buffers and exchanges in "
                "flight change from call to call on the host); remove_cuda_graph(transformer) first"
            )
        call = dict(self.signature.bind(*args, **kwargs).arguments)
        timestep = call.get("timestep")
        if not isinstance(timestep, Tensor) or timestep.numel() == 0:
            raise ValueError(
                "displaced FLUX: the call needs a timestep tensor (a new run starts when it does not decrease)"
            )
        t = float(timestep.reshape(-1)[0])
        pair = cfg_branches(module)
        branch = "+".join(pair.names) if pair is not None else state.branch_name or "default"
        hidden, text = call.get("hidden_states"), call.get("encoder_hidden_states")
        key = tuple(tuple(x.shape) if isinstance(x, Tensor) else None for x in (hidden, text))
        key += (getattr(hidden, "dtype", None),)
        run = state.runs.get(branch)
        if run is not None and t == run.timestep and run.step >= 2:
            raise ValueError(
                f"displaced FLUX: two calls in a row at timestep {t:g} in branch {branch!r} (a new run would start "
                "with the second): name true CFG's two calls with transformer.cache_context('cond') / ('uncond') "
                "as FluxPipeline does; a sampler that calls one timestep twice (Heun) does not fit this mode"
            )
        new = run is None or run.timestep is None or t >= run.timestep or run.key != key
        step = 0 if new else run.step
        phase = WARM_UP if step < state.warmup_steps - 1 else LAST_WARM_UP if step < state.warmup_steps else DISPLACED
        if state.mesh.check_ranks:  # every rank in the same phase, or the exchanges would not pair up
            agree(state.mesh.world_group, "displaced FLUX", ("branch", "phase"), (branch, phase))
        if new:
            if run is not None:
                run.drop(wait=True)
            run = state.runs[branch] = _Run(key)
        try:
            with state.step.entered(DisplacedStep(run, phase)):
                out = _parallel_call(inner, state, call)
        except BaseException:
            run.drop(wait=False)  # the ranks may have stopped at different layers
            state.runs.pop(branch, None)
            raise
        run.step, run.timestep = run.step + 1, t
        return out

    def end_pipeline_call(self, *, failed: bool) -> None:
        self.state.reset(wait=not failed)  # the stale k/v belong to one pipeline call

    def release(self, module: torch.nn.Module) -> None:
        self.state.reset()
        remove_hook(module, CONTEXT_HOOK, method="cache_context")


class _BranchName(Hook):
    """On ``cache_context``: the name of the branch called inside it (diffusers' pipelines say "cond", "uncond")."""

    def __init__(self, state: _DisplacedState) -> None:
        self.state = state

    def call(self, module: torch.nn.Module, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        name = args[0] if args else kwargs.get("name")
        return self._named(inner(*args, **kwargs), str(name))

    @contextmanager
    def _named(self, context: Any, name: str) -> Iterator[None]:
        with context:
            previous, self.state.branch_name = self.state.branch_name, name
            try:
                yield
            finally:
                self.state.branch_name = previous


def parallelize_flux_displaced(
    transformer: FluxTransformer2DModel,
    mesh: ParallelMesh,
    *,
    warmup_steps: int,
    text: str = "replicate",
    backend: str = "auto",
) -> FluxTransformer2DModel:
    """Make ``transformer`` compute with **inexact** displaced (stale-KV) patch parallelism on ``mesh``; returns it.

    Not exact: after the first ``warmup_steps`` steps of each run (exact, as
    :func:`~models.flux.parallelize_flux` with the same ``text``), each rank's attention uses the
    other ranks' k/v of the previous step (module docstring; ``docs/displaced.md``). ``mesh`` needs
    at least two sequence-parallel ranks (``ulysses × ring``; its ``batch`` axis splits samples as in
    the exact mode). ``text``: ``"replicate"`` (text k/v fresh on every rank) or ``"shard"`` (stale
    like the image's). ``backend``: the attention kernel. Call it like the plain model, on every rank
    with the same full inputs and a timestep tensor; every rank gets the full output. Memory: the
    stale k/v of every attention layer, ``L · 2 · B_local · P · ceil(N / P) · H · D`` elements per
    branch (module docstring). CUDA graphs are refused.
    """
    what = "parallelize_flux_displaced"
    processors = _check_flux(transformer, mesh, text, what)
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
        raise ValueError(
            f"{what}: warmup_steps must be an int of at least 1 (exact steps that fill the stale k/v), got "
            f"{warmup_steps!r}"
        )
    if mesh.tp_size > 1:
        raise ValueError(f"{what}: tensor parallelism (mesh {mesh.describe()}) does not combine with this mode")
    if mesh.sp_size < 2:
        raise ValueError(
            f"{what}: mesh {mesh.describe()} has no sequence-parallel ranks to displace patches over (sp size "
            f"{mesh.sp_size}); build it with ulysses × ring >= 2"
        )
    if get_hook(transformer, CUDA_GRAPH_HOOK) is not None:
        raise ValueError(f"{what}: a CUDA graph cannot replay this mode; remove_cuda_graph(transformer) first")
    if get_hook(transformer, STEP_HOOK) is not None:
        raise ValueError(f"{what}: {CACHE_REFUSED}; disable_cache(transformer) first")
    context = CallContext("parallel FLUX", JointLayout)
    state = _DisplacedState(mesh=mesh, text=text, processors=processors, context=context, warmup_steps=warmup_steps)
    transformer.set_attn_processor(
        {name: DisplacedFluxProcessor(mesh, context, state.step, name, backend=backend) for name in processors}
    )
    if callable(getattr(transformer, "cache_context", None)):
        install_hook(transformer, CONTEXT_HOOK, _BranchName(state), method="cache_context")
    install_hook(transformer, BOUNDARY_HOOK, _DisplacedBoundary(state, inspect.signature(transformer.forward)))
    return transformer


def _displaced(transformer: Any, what: str) -> _DisplacedState:
    boundary = get_hook(transformer, BOUNDARY_HOOK) if isinstance(transformer, torch.nn.Module) else None
    if not isinstance(boundary, _DisplacedBoundary):
        exact = " (parallelize_flux made it exact: unparallelize_flux undoes that)" if boundary is not None else ""
        raise ValueError(f"{what}: this transformer is not displaced-parallel{exact}")
    return boundary.state


def reset_flux_displaced(transformer: FluxTransformer2DModel) -> FluxTransformer2DModel:
    """Start a new run on every branch: the next call of each is a warm-up step again; the stale k/v are dropped.

    Call it on every rank alike (no communication: it waits for this rank's exchanges in flight)."""
    _displaced(transformer, "reset_flux_displaced").reset()
    return transformer


def unparallelize_flux_displaced(transformer: FluxTransformer2DModel) -> FluxTransformer2DModel:
    """Undo :func:`parallelize_flux_displaced` (and a CFG pairing on it): the original processors and ``forward``."""
    _displaced(transformer, "unparallelize_flux_displaced")
    return unparallelize_flux(transformer)
