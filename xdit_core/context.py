"""The per-call context of a parallel model: what its boundary decided, read by its processors.

A parallel model's boundary hook splits the call (:mod:`xdit_core.plan`) and knows the layout that
results (which tokens each rank holds). Its attention processors need that layout, but they are
called by the model's own code, several layers down, with the model's own arguments. Rather than
smuggling it through the model's keyword arguments (diffusers' ``joint_attention_kwargs``), the
adapter gives the model's processors one :class:`CallContext` when it installs them; the boundary
sets the call's layout on it for the duration of the call (``with context.entered(layout):``), and a
processor reads it with ``context.layout``. The value is typed (the adapter's frozen dataclass), the
context belongs to one model instance, and it is empty outside a call, so a processor used on its
own fails with a clear error instead of attending over the wrong tokens.

One call at a time per model instance (a parallel model's ranks move in lock step; two threads
calling one instance concurrently would interleave its collectives anyway): a nested or concurrent
call on the same instance raises.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Generic, TypeVar

T = TypeVar("T")


class CallContext(Generic[T]):
    """The layout of the call in progress on one parallel model (``None`` between calls)."""

    def __init__(self, what: str, kind: type[T]) -> None:
        self.what = what
        self.kind = kind
        self._layout: T | None = None

    @contextmanager
    def entered(self, layout: T) -> Iterator[T]:
        """Hold ``layout`` while the body runs (the model's forward)."""
        if not isinstance(layout, self.kind):
            raise TypeError(f"{self.what}: the call's layout must be a {self.kind.__name__}, got {type(layout)}")
        if self._layout is not None:
            raise RuntimeError(f"{self.what}: the model is already in a call (nested or concurrent calls)")
        self._layout = layout
        try:
            yield layout
        finally:
            self._layout = None

    @property
    def active(self) -> bool:
        """Whether a call is in progress."""
        return self._layout is not None

    @property
    def layout(self) -> T:
        """The current call's layout; a ``ValueError`` outside a call of the parallel model."""
        if self._layout is None:
            raise ValueError(
                f"{self.what}: no parallel call in progress: call the model that the adapter made parallel, "
                "not one of its blocks or attention modules on its own"
            )
        return self._layout

    def __repr__(self) -> str:
        return f"CallContext({self.what!r}, {self.kind.__name__}, in call: {self._layout is not None})"
