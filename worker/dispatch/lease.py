"""The lease keeper: a running step's line stays owned by its worker while the worker lives."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from worker.runtime import Runtime

log = logging.getLogger(__name__)


class Heartbeat(threading.Thread):
    """Keeps the leases of the steps running in this process alive, so a slow provider call
    is not taken for a dead worker, while a really dead worker's lines are taken over soon."""

    def __init__(self, rt: Runtime, host: str) -> None:
        super().__init__(name="imagebatch-heartbeat", daemon=True)
        self.rt, self.host = rt, host
        self.running: dict[tuple[str, str], int] = {}
        self.lock = threading.Lock()
        self.stopped = threading.Event()

    @contextmanager
    def holding(self, zset: str, member: str) -> Iterator[None]:
        entry = (zset, member)
        with self.lock:
            self.running[entry] = self.running.get(entry, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.running[entry] -= 1
                if not self.running[entry]:
                    del self.running[entry]

    def beat(self) -> None:
        lease = self.rt.settings.lease_s
        with self.lock:
            entries = list(self.running)
        if entries:
            self.rt.state.renew(entries, time.time() + lease)
        self.rt.state.worker_alive(self.host, os.getpid(), ttl=max(30.0, 3 * lease))

    def run(self) -> None:
        while not self.stopped.wait(self.rt.settings.lease_s / 3):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - Redis away: the next beat tries again
                log.warning("heartbeat failed: %s", exc)

    def stop(self) -> None:
        self.stopped.set()
