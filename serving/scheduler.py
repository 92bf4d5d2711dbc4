"""The request queue on the serving rank: bounded, first come first served, batching compatible requests.

``submit`` queues a request and returns a ``concurrent.futures.Future`` the engine resolves; a full
queue raises :class:`QueueFull` (the server answers 429). ``next_batch`` hands the engine the oldest
request together with the queued requests that can share its pipeline call (equal ``batch_key``:
size, steps, guidance), oldest first, up to ``max_batch_images`` images; when the batch is not full it
waits for more up to ``max_wait_s`` after the oldest request arrived. An incompatible request waits for
its own turn; nothing overtakes the oldest request. ``cancel`` withdraws a request that has not started
(its client went away).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

Progress = Callable[[float], None]


class QueueFull(Exception):
    """The queue holds ``max_queue`` requests already."""


@dataclass(eq=False)
class Entry:
    """A queued request, its future, when it arrived and how many images it asks for."""

    request: Any  # ImageRequest | VideoRequest
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    progress: Progress | None = None

    @property
    def images(self) -> int:
        return getattr(self.request, "n", 1)


class Scheduler:
    """Thread-safe: the HTTP handlers submit and cancel, the engine thread takes batches."""

    def __init__(self, *, max_batch_images: int, max_wait_s: float, max_queue: int) -> None:
        if max_batch_images < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError(
                f"Scheduler: max_batch_images={max_batch_images} and max_queue={max_queue} must be >= 1, "
                f"max_wait_s={max_wait_s} >= 0"
            )
        self.max_batch_images, self.max_wait_s, self.max_queue = max_batch_images, max_wait_s, max_queue
        self._pending: list[Entry] = []
        self._changed = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        with self._changed:
            return len(self._pending)

    def submit(self, request: Any, progress: Progress | None = None) -> Future:
        """Queue ``request``; its future gets the engine's result. Raises :class:`QueueFull`, or
        ``RuntimeError`` once the scheduler is closed (the server is stopping)."""
        with self._changed:
            if self._closed:
                raise RuntimeError("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"the queue holds {self.max_queue} requests; try again later")
            entry = Entry(request, progress=progress)
            self._pending.append(entry)
            self._changed.notify_all()
            return entry.future

    def cancel(self, future: Future) -> bool:
        """Withdraw the queued request of ``future`` (``True``); ``False`` if it has started or finished."""
        with self._changed:
            for entry in self._pending:
                if entry.future is future:
                    self._pending.remove(entry)
                    entry.future.cancel()
                    self._changed.notify_all()
                    return True
        return False

    def close(self) -> None:
        """Take no new requests; the queued ones are still handed out (drained)."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed

    def fail_all(self, error: BaseException) -> int:
        """Resolve every queued request with ``error`` (the engine stopped); returns how many."""
        with self._changed:
            pending, self._pending = self._pending, []
        for entry in pending:
            entry.future.set_exception(error)
        return len(pending)

    def next_batch(self, timeout_s: float) -> list[Entry] | None:
        """The next batch (oldest request first), or ``None`` when nothing arrived within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                if not self._pending:  # nothing queued (or all of it withdrawn while waiting for company)
                    left = deadline - time.monotonic()
                    if left <= 0 or self._closed:
                        return None
                    self._changed.wait(left)
                    continue
                batch = self._compatible(self._pending[0])
                images = sum(e.images for e in batch)
                ready_at = self._pending[0].arrived + self.max_wait_s
                now = time.monotonic()
                if images >= self.max_batch_images or now >= ready_at or self._closed or self._single(batch[0]):
                    break
                self._changed.wait(ready_at - now)
            for entry in batch:
                self._pending.remove(entry)
            return batch

    def _compatible(self, head: Entry) -> list[Entry]:
        key, batch, images = head.request.batch_key(), [head], head.images
        for entry in self._pending[1:]:
            if entry.request.batch_key() == key and images + entry.images <= self.max_batch_images:
                batch.append(entry)
                images += entry.images
        return batch

    @staticmethod
    def _single(entry: Entry) -> bool:
        """Requests that never share a call (videos: their key is unique) do not wait for company."""
        return entry.request.batch_key()[0] == "video"
