"""Replay a fixed-shape call from a CUDA graph: no CPU work per call but copying the inputs in.

A denoising loop calls its model with the same shapes every step; eager PyTorch then spends most of
a small step issuing kernels (and, in parallel, collectives) from Python. :class:`CudaGraphed`
captures the call once per input signature (tensor shapes, dtypes and devices; every other argument
by value) and replays it. NCCL collectives are captured with the kernels, so a sequence-parallel
model replays whole.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule
from torch.utils import _pytree as pytree

from xdit_core.hooks import Hook, install_hook, offload_hook_on, remove_hook


class CudaGraphed:
    """``fn(**kwargs)`` replayed from a CUDA graph captured on the first call with each input signature.

    ``fn`` must return a tensor or a tuple of tensors, issue no host synchronisation, and be
    called the same way on every rank (collectives inside are captured). Graphs of different
    signatures share one memory pool. Returned tensors are fresh copies. Calls that need gradients,
    or whose tensors are not all on CUDA, run ``fn`` directly.
    """

    def __init__(self, fn: Callable[..., Any], *, warmup: int = 2) -> None:
        self.fn = fn
        self.warmup = warmup
        self.graphs: dict[Any, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any]] = {}
        self.pool: Any = None

    def __call__(self, **kwargs: Any) -> Any:
        leaves, spec = pytree.tree_flatten(kwargs)
        tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
        if (
            not tensors
            or any(t.device.type != "cuda" for t in tensors)
            or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        ):
            return self.fn(**kwargs)
        key = (
            str(spec),
            tuple((t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else repr(t) for t in leaves),
        )
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(leaves, spec)
        graph, static_inputs, static_out = entry
        for static, t in zip(static_inputs, tensors, strict=True):
            static.copy_(t)
        graph.replay()
        return pytree.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, static_out)

    def _capture(self, leaves: list[Any], spec: Any) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor], Any]:
        static_leaves = [x.clone() if isinstance(x, torch.Tensor) else x for x in leaves]
        static_kwargs = pytree.tree_unflatten(static_leaves, spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):
            for _ in range(self.warmup):  # kernel choices, communicators and workspaces settle first
                self.fn(**static_kwargs)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph, pool=self.pool):
            out = self.fn(**static_kwargs)
        return graph, [x for x in static_leaves if isinstance(x, torch.Tensor)], out


CUDA_GRAPH_HOOK = "xdit.cuda_graph"


class _GraphHook(Hook):
    """Replays the rest of the chain (and the module's method) from CUDA graphs, one per input signature."""

    def __init__(self, signature: inspect.Signature, warmup: int) -> None:
        self.signature = signature
        self.inner: Callable[..., Any] | None = None
        self.graphed = CudaGraphed(self._run_inner, warmup=warmup)

    def _run_inner(self, **kwargs: Any) -> Any:
        assert self.inner is not None
        return self.inner(**kwargs)

    def call(self, module: torch.nn.Module, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        self.inner = inner  # the chain below this hook: the same function on every call
        return self.graphed(**self.signature.bind(*args, **kwargs).arguments)


def apply_cuda_graph(module: torch.nn.Module, *, method: str = "forward", warmup: int = 2) -> torch.nn.Module:
    """Replay ``module``'s ``method`` from CUDA graphs (:class:`CudaGraphed`): a hook named
    ``"xdit.cuda_graph"`` outside the hooks installed so far (e.g. a model adapter's), so the graph
    holds the whole parallel call, collectives included. Returns ``module``; :func:`remove_cuda_graph` undoes it.

    The call must return tensors (or tuples / diffusers outputs of them) and issue no host
    synchronisation; calls that need gradients or hold non-CUDA tensors run eagerly.
    """
    if isinstance(module, FSDPModule):
        raise ValueError(
            "apply_cuda_graph: this module's weights are sharded with FSDP2 (shard_weights), whose weight gathers "
            "a CUDA graph cannot follow"
        )
    offloaded = offload_hook_on(module)
    if offloaded is not None:
        raise ValueError(
            f"apply_cuda_graph: this module's weights are offloaded ({offloaded}); a CUDA graph replays the addresses "
            "of its first capture, which offload hooks move between calls"
        )
    hook = _GraphHook(inspect.signature(getattr(module, method)), warmup)
    install_hook(module, CUDA_GRAPH_HOOK, hook, method=method)
    return module


def remove_cuda_graph(module: torch.nn.Module, *, method: str = "forward") -> torch.nn.Module:
    """Undo :func:`apply_cuda_graph` (nothing if it was not applied); returns ``module``."""
    remove_hook(module, CUDA_GRAPH_HOOK, method=method)
    return module
