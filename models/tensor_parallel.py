"""Tensor parallelism on torch's DTensor engine (``parallelize_module``), over a mesh's ``tp`` axis.

A plan maps module paths to torch's styles: ``"colwise"`` (``ColwiseParallel``: the output features split,
each rank computing its share, e.g. its heads) and ``"rowwise"`` (``RowwiseParallel``: the input features
split, the partial outputs all-reduced). A *packed* Linear fuses several streams: a colwise one several
outputs (STDiT3's ``qkv`` is ``[q; k; v]``), a rowwise one an input that concatenates column-split streams
(FLUX's single-block ``proj_out`` takes ``[attention heads; MLP]``). Its output rows (colwise) or input
columns (rowwise) are permuted first so that rank ``t``'s contiguous chunk is ``[stream 0's share t;
stream 1's share t; ...]`` (``packed``: the stream widths); undoing restores the original order.

:func:`apply_tp` applies a plan and returns a :class:`TensorParallel` record that :func:`remove_tp` uses to
undo it exactly (weights gathered back into plain parameters, torch's forward hooks removed).
:func:`parameter_bytes` is the bytes of parameters one rank holds (what the benchmarks report).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from xdit_core.mesh import ParallelMesh

STYLES = ("colwise", "rowwise")


@dataclass
class TensorParallel:
    """What :func:`apply_tp` did: the modules it split (by path) and the hooks torch added to each."""

    mesh: ParallelMesh
    plan: dict[str, str]
    packed: dict[str, tuple[int, ...]]
    hooks: dict[str, tuple[set[int], set[int]]] = field(default_factory=dict)  # path -> (pre, post) hook ids


def _interleave(width: int, packed: tuple[int, ...], tp: int) -> torch.Tensor:
    """Input-column order that makes rank ``t``'s contiguous chunk ``[stream 0 share t; stream 1 share t; ...]``."""
    starts = [sum(packed[:i]) for i in range(len(packed))]
    if sum(packed) != width:
        raise ValueError(f"packed widths {packed} do not add up to the layer's {width} input features")
    order = [
        start + t * (size // tp) + j
        for t in range(tp)
        for start, size in zip(starts, packed, strict=True)
        for j in range(size // tp)
    ]
    return torch.tensor(order)


@torch.no_grad()
def _permute(module: nn.Linear, style: str, packed: tuple[int, ...], tp: int, *, undo: bool) -> None:
    """Reorder a packed Linear's output rows (colwise; the bias too) or input columns (rowwise), or undo it."""
    columns = style == "rowwise"
    order = _interleave(module.in_features if columns else module.out_features, packed, tp)
    for name, param in module.named_parameters(recurse=False):
        if columns and name != "weight":
            continue  # a rowwise bias is added after the all-reduce, whole
        dim = 1 if columns else 0
        index = order.to(param.device)
        if undo:
            restored = torch.empty_like(param)
            restored.index_copy_(dim, index, param)
            param.copy_(restored)
        else:
            param.copy_(param.index_select(dim, index))


def apply_tp(
    model: nn.Module, mesh: ParallelMesh, plan: dict[str, str], packed: dict[str, tuple[int, ...]] | None = None
) -> TensorParallel:
    """Split ``model``'s Linears named in ``plan`` (path -> ``"colwise"`` / ``"rowwise"``) over ``mesh``'s ``tp``
    axis; ``packed``: the stream widths of packed Linears (module docstring).
    Divisibility is the caller's check (it knows the model's heads and widths)."""
    packed = dict(packed or {})
    tp_mesh = DeviceMesh.from_group(mesh.tp_group, mesh.device_mesh.device_type)
    record = TensorParallel(mesh, dict(plan), packed)
    styles = {"colwise": ColwiseParallel, "rowwise": RowwiseParallel}
    for path, style in plan.items():
        module = model.get_submodule(path)
        if path in packed:
            _permute(module, style, packed[path], mesh.tp_size, undo=False)
        before = set(module._forward_pre_hooks), set(module._forward_hooks)
        parallelize_module(module, tp_mesh, styles[style]())
        added = set(module._forward_pre_hooks) - before[0], set(module._forward_hooks) - before[1]
        record.hooks[path] = added
    return record


def remove_tp(model: nn.Module, record: TensorParallel) -> None:
    """Undo :func:`apply_tp`: every split parameter gathered back into a plain one (the packed input order
    restored), torch's hooks removed. Every rank of the ``tp`` axis calls it (the gathers are collective)."""
    for path in record.plan:
        module = model.get_submodule(path)
        for name, param in list(module.named_parameters(recurse=False)):
            if isinstance(param, DTensor):
                full = param.full_tensor().detach().clone()
                module.register_parameter(name, nn.Parameter(full, requires_grad=param.requires_grad))
        if path in record.packed:
            _permute(module, record.plan[path], record.packed[path], record.mesh.tp_size, undo=True)
        pre, post = record.hooks[path]
        for key in pre:
            del module._forward_pre_hooks[key]
        for key in post:
            del module._forward_hooks[key]
        # torch marks a module distribute_module has seen, and refuses it a second time: the mark goes too
        module.__dict__.pop("_distribute_module_applied", None)


def block_plan(model: nn.Module, lists: tuple[str, ...], per_block: dict[str, str], what: str) -> dict[str, str]:
    """``per_block`` (path within a block -> style) for every block of ``model``'s block lists ``lists``; a planned
    layer that is not a ``torch.nn.Linear`` (a model with unexpected layers) raises, naming it."""
    plan = {}
    for name in lists:
        for i in range(len(getattr(model, name))):
            for path, style in per_block.items():
                full = f"{name}.{i}.{path}"
                try:
                    module = model.get_submodule(full)
                except AttributeError:
                    module = None
                if type(module) is not nn.Linear and not getattr(module, "splits_like_linear", False):
                    found = "nothing" if module is None else type(module).__name__
                    raise ValueError(f"{what}: {full} must be a torch.nn.Linear to split, found {found}")
                plan[full] = style
    return plan


def degrees_for(heads: int, widths: list[int]) -> list[int]:
    """The tensor-parallel degrees that give each rank whole heads and an equal share of every MLP width."""
    return [d for d in range(1, heads + 1) if heads % d == 0 and all(w % d == 0 for w in widths)]


def check_degree(tp: int, degrees: list[int], what: str, model: str) -> None:
    """A ``ValueError`` naming the valid degrees when ``tp`` is not one of them."""
    if tp not in degrees:
        raise ValueError(
            f"{what}: tensor-parallel degree {tp} does not divide this {model} and MLP widths; valid degrees: {degrees}"
        )


def is_tensor_parallel(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a DTensor (split by tensor parallelism or sharded by FSDP2)."""
    return any(isinstance(p, DTensor) for p in model.parameters())


def parameter_bytes(model: nn.Module) -> int:
    """The bytes of parameters this rank holds: a DTensor's local shard, a plain parameter whole."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        total += local.numel() * local.element_size()
    return total
