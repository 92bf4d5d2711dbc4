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
can be installed and removed in any order. A chain left under someone else's wrapper when its last
hook is removed stays as a pass-through to the original method (bit-identical results).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch

_CHAINS = "_xdit_hook_chains"  # module.__dict__ entry: {method name: _Chain}


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
        """Put back what the slot held, if the slot still holds this chain; whether it did.

        (A registry that had the chain as its innermost function and lost all its hooks since put the
        chain into the module's method itself: that is undone too.)
        """
        if _read(self.slot) is not self.wrapper:
            return False
        _write(self.slot, self.previous)
        attrs = self.module.__dict__
        if attrs.get(method) is self.wrapper:
            bound_from_class = getattr(type(self.module), method).__get__(self.module)
            if self.original == bound_from_class:
                del attrs[method]
            else:
                attrs[method] = self.original
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
    """A chain on ``method``: under diffusers' hooks if the module's registry has some, else in the method's place."""
    registry = module.__dict__.get("_diffusers_hook")
    refs = list(getattr(registry, "_fn_refs", None) or []) if method == "forward" else []
    if refs:  # the registry's innermost reference holds the function its first hook wraps
        innermost = refs[0]
        key = "original_forward" if innermost.original_forward is not None else "forward"
        return _Chain(module, getattr(innermost, key), (innermost, key))
    return _Chain(module, getattr(module, method), (module.__dict__, method))


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
