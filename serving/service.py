"""Rank 0's whole server: the scheduler, the app on uvicorn (in a thread of its own), the engine's lead.

``xdit serve`` runs it with its signal handlers (SIGTERM and SIGINT drain); the serving benchmark runs it
in-process around a pipeline it built itself. Uvicorn runs outside the main thread so it installs no
signal handlers of its own: stopping is the engine's decision, after the queue is drained.
"""

from __future__ import annotations

import logging
import tempfile
import threading
from pathlib import Path
from typing import Any

import uvicorn

from serving.engine import Engine, EngineStopped, Fault
from serving.scheduler import Scheduler
from serving.server import ServerState, create_app

log = logging.getLogger("xdit.serve")


class Service:
    """``served`` behind HTTP on ``host:port``; ``control``: the engine's group (rank 0 of it)."""

    def __init__(
        self,
        served: Any,
        control: Any,
        *,
        host: str,
        port: int,
        max_batch_images: int,
        max_wait_s: float,
        max_queue: int,
        output_dir: str | None = None,
        max_stored: int = 1000,
        faults: tuple[Fault, ...] = (),
        log_level: str = "info",
        png_level: int = 0,
    ) -> None:
        self.scheduler = Scheduler(max_batch_images=max_batch_images, max_wait_s=max_wait_s, max_queue=max_queue)
        self._temp = tempfile.TemporaryDirectory(prefix="xdit_serve_") if output_dir is None else None
        folder = Path(self._temp.name if self._temp is not None else output_dir)
        self.state = ServerState(served.limits, self.scheduler, folder, max_stored=max_stored, png_level=png_level)
        config = uvicorn.Config(create_app(self.state), host=host, port=port, log_level=log_level,
                                timeout_graceful_shutdown=30)  # fmt: skip
        self.http = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.http.run, name="xdit-http", daemon=True)
        self.engine = Engine(
            served, control, scheduler=self.scheduler, faults=faults, on_batch=self.state.metrics.on_batch
        )

    def run(self) -> int:
        """Serve until :meth:`drain` and the queue is empty (0), or the engine stops on a broken group (1)."""
        self._thread.start()
        code = 0
        try:
            self.engine.lead()
        except EngineStopped as e:
            self.state.stopping, code = "stopped", 1
            log.error("rank 0: stopping the server: %s", e)
        self.state.writer.shutdown(wait=True)  # the last MP4s are written
        self.http.should_exit = True  # uvicorn lets open responses finish (30 s at most)
        self._thread.join(timeout=60)
        if self._temp is not None:
            self._temp.cleanup()
        return code

    def drain(self, why: str = "asked to stop") -> None:
        """Take no new requests (503), finish the queued ones, then :meth:`run` returns. Any thread."""
        if self.state.stopping is None:
            log.info("rank 0: %s: draining %d queued request(s), then stopping", why, len(self.scheduler))
            self.state.stopping = "draining"
            threading.Thread(target=self.scheduler.close, name="xdit-drain").start()  # never inside its lock
