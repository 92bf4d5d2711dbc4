"""One ordered, per-instance hook chain around a module's method (``forward``, or e.g. a VAE's ``decode``).

An adapter changes an instance from outside by installing named hooks; removing them restores the
method bit for bit. No class is patched: the chain is an instance attribute of the module, so other
instances are untouched. The hook installed last runs outermost (as in diffusers' ``HookRegistry``)::

    module.forward(x)  →  hook B.pre → hook A.pre → original forward → hook A.post → hook B.post

A hook overrides any of ``pre`` (change the arguments), ``call`` (run, replace or skip the inner
call) and ``post`` (change the result).

**Living with diffusers' ``HookRegistry``.** diffusers wraps ``forward`` the same way, and its
removal assumes nothing was wrapped around its own hooks afterwards (removing its outermost hook sets
``module.forward`` back to what that hook captured). So the chain always sits *below* diffusers'
hooks: installed on a module whose registry already has hooks, it takes the place of the registry's
innermost ``forward``; installed first, it is what diffusers captures later. Either way both sides
can be installed and removed in any order. The same holds under accelerate's hooks (diffusers'
model and sequential CPU offload): ``add_hook_to_module`` makes ``forward`` call ``module._old_forward``
and its removal puts ``_old_forward`` back, so a chain installed on such a module takes the place of
``_old_forward``. A chain left under someone else's wrapper when its last hook is removed stays as a
pass-through to the original method (bit-identical results).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_CHAINS = "_xdit_hook_chains"  # module.__dict__ entry: {method name: _Chain}
_ACCELERATE_INNER = "_old_forward"  # what accelerate's add_hook_to_module wraps (and puts back into forward)


class Hook:
    """Base hook: every step passes through. Subclass and override what the hook changes."""

    def pre(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def call(self, module: torch.nn.Module, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        return inner(*args, **kwargs)

    def post(self, module: torch.nn.Module, out: Any) -> Any:
        return out


class _Chain:
    """The hooks of one method of one module, and ``wrapper``: the function put in the method's place.

    ``original`` is what the chain wraps; ``slot`` is where ``wrapper`` was put: ``(module.__dict__,
    method)``, or ``(a diffusers function reference, its attribute)`` under a registry; ``previous``
    what the slot held before (``_ABSENT``: nothing, the class's method showed through).
    """

    def __init__(self, module: torch.nn.Module, original: Callable[..., Any], slot: tuple[Any, str]) -> None:
        self.module = module
        self.original = original
        self.slot = slot
        self.previous = _read(slot)
        self.hooks: dict[str, Hook] = {}

        @functools.wraps(original)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return self._run(len(self.hooks) - 1, list(self.hooks.values()), args, kwargs)

        self.wrapper = wrapper
        _write(slot, wrapper)

    def _run(self, i: int, order: list[Hook], args: tuple, kwargs: dict) -> Any:
        if i < 0:
            return self.original(*args, **kwargs)
        hook = order[i]
        args, kwargs = hook.pre(self.module, args, kwargs)

        def inner(*a: Any, **k: Any) -> Any:
            return self._run(i - 1, order, a, k)

        return hook.post(self.module, hook.call(self.module, inner, args, kwargs))

    def unlink(self, method: str) -> bool:
        """Put back what the chain replaced, if no one has wrapped it since; whether that was so.

        The slot gets what it held before. Where another library moved the chain itself into the
        module's method (a diffusers registry that lost all its hooks, accelerate's hook removal) or
        into accelerate's ``_old_forward``, the original function goes back there instead.
        """
        attrs = self.module.__dict__
        moved = [key for key in (method, _ACCELERATE_INNER) if attrs.get(key) is self.wrapper]
        if _read(self.slot) is self.wrapper:
            _write(self.slot, self.previous)
        elif not moved:
            return False
        for key in moved:
            if attrs.get(key) is not self.wrapper:  # the slot itself, put back above
                continue
            bound_from_class = getattr(type(self.module), method).__get__(self.module)
            if key == method and self.original == bound_from_class:
                del attrs[key]
            else:
                attrs[key] = self.original
        return True


_ABSENT = object()


def _read(slot: tuple[Any, str]) -> Any:
    holder, key = slot
    return holder.get(key, _ABSENT) if isinstance(holder, dict) else getattr(holder, key)


def _write(slot: tuple[Any, str], value: Any) -> None:
    holder, key = slot
    if not isinstance(holder, dict):
        setattr(holder, key, value)
    elif value is _ABSENT:
        holder.pop(key, None)
    else:
        holder[key] = value


def _new_chain(module: torch.nn.Module, method: str) -> _Chain:
    """A chain on ``method``: under diffusers' or accelerate's hooks where the module has some, else in its place."""
    registry = module.__dict__.get("_diffusers_hook")
    refs = list(getattr(registry, "_fn_refs", None) or []) if method == "forward" else []
    if refs:  # the registry's innermost reference holds the function its first hook wraps
        innermost = refs[0]
        key = "original_forward" if innermost.original_forward is not None else "forward"
        return _Chain(module, getattr(innermost, key), (innermost, key))
    attrs = module.__dict__
    if method == "forward" and "_hf_hook" in attrs and _ACCELERATE_INNER in attrs:  # under accelerate's hook
        return _Chain(module, attrs[_ACCELERATE_INNER], (attrs, _ACCELERATE_INNER))
    return _Chain(module, getattr(module, method), (attrs, method))


def install_hook(module: torch.nn.Module, name: str, hook: Hook, *, method: str = "forward") -> None:
    """Add ``hook`` as the outermost of ``module``'s ``method`` chain under ``name``.

    Idempotent: installing the same hook object under the same name again does nothing; another
    hook under a taken name raises ``ValueError`` (remove it first).
    """
    if not isinstance(hook, Hook):
        raise ValueError(f"install_hook needs an xdit_core.hooks.Hook, got {type(hook).__name__}")
    if not callable(getattr(module, method, None)):
        raise ValueError(f"install_hook: {type(module).__name__} has no method {method!r}")
    chains: dict[str, _Chain] = module.__dict__.setdefault(_CHAINS, {})
    chain = chains.get(method)
    if chain is not None and name in chain.hooks:
        if chain.hooks[name] is hook:
            return
        raise ValueError(f"install_hook: {type(module).__name__}.{method} already has a hook named {name!r}")
    if chain is None:
        chain = chains[method] = _new_chain(module, method)
    chain.hooks[name] = hook


def remove_hook(module: torch.nn.Module, name: str, *, method: str = "forward") -> None:
    """Remove the hook ``name`` from ``module``'s ``method`` chain (nothing if it is not there).

    When the last hook goes, what the chain replaced comes back; a chain that something else has
    wrapped since stays in place as a pass-through (and serves the next install).
    """
    chains: dict[str, _Chain] = module.__dict__.get(_CHAINS, {})
    chain = chains.get(method)
    if chain is None or name not in chain.hooks:
        return
    del chain.hooks[name]
    if not chain.hooks and chain.unlink(method):
        del chains[method]
        if not chains:
            del module.__dict__[_CHAINS]


def hook_names(module: torch.nn.Module, *, method: str = "forward") -> list[str]:
    """The names of ``module``'s ``method`` hooks, innermost first."""
    chain = module.__dict__.get(_CHAINS, {}).get(method)
    return [] if chain is None else list(chain.hooks)


def get_hook(module: torch.nn.Module, name: str, *, method: str = "forward") -> Hook | None:
    """The hook installed under ``name`` on ``module``'s ``method``, or ``None``."""
    chain = module.__dict__.get(_CHAINS, {}).get(method)
    return None if chain is None else chain.hooks.get(name)


_OFFLOAD_REGISTRY_HOOKS = ("group_offloading", "lazy_prefetch_group_offloading")  # diffusers' group offloading


def offload_hook_on(module: torch.nn.Module) -> str | None:
    """Where CPU-offload hooks of other libraries sit on ``module`` or a submodule (the first found), or ``None``.

    Recognised by the attributes they leave, without importing them: accelerate's ``_hf_hook``
    (diffusers' model and sequential offload) and diffusers' group offloading in a module's
    ``HookRegistry``. Features that need the weights to stay put (CUDA graphs, FSDP2) refuse such modules.
    """
    for name, sub in module.named_modules():
        where = name or type(module).__name__
        if "_hf_hook" in sub.__dict__:
            return f"accelerate's {type(sub.__dict__['_hf_hook']).__name__} on {where}"
        registry_hooks = getattr(sub.__dict__.get("_diffusers_hook"), "hooks", None) or {}
        if any(key in registry_hooks for key in _OFFLOAD_REGISTRY_HOOKS):
            return f"diffusers' group offloading on {where}"
    return None
