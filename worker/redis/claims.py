"""A claim on a piece of work that only one of several processes may do (an inbox manifest):
taken with ``SET NX`` and a lease, kept alive by a thread while held, then turned into a
record or released, always compare-and-write on its owner token."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any, cast

import redis

from jobs.clock import now_iso

log = logging.getLogger(__name__)


# --- claims ----------------------------------------------------------------------------------


class Claim:
    """Our claim on one manifest: renewed while held, then ``submitted`` or released."""

    def __init__(
        self, client: redis.Redis[str], key: str, value: dict[str, Any], lease_s: float
    ) -> None:
        self.client, self.key, self.value, self.lease_s = client, key, value, lease_s
        self.token = str(value["owner"])
        self.lost = False

    @classmethod
    def take(
        cls, client: redis.Redis[str], key: str, lease_s: float
    ) -> Claim | dict[str, Any] | None:
        """Ours, or what another scheduler's claim says (None: it vanished; try later)."""
        value: dict[str, Any] = {"state": "claimed", "owner": uuid.uuid4().hex}
        value |= {"host": socket.gethostname(), "pid": os.getpid(), "at": now_iso()}
        if client.set(key, json.dumps(value), nx=True, px=int(lease_s * 1000)):
            return cls(client, key, value, lease_s)
        held = client.get(key)
        return json.loads(held) if held else None

    @contextlib.contextmanager
    def kept_alive(self) -> Iterator[Claim]:
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(self.lease_s / 4):
                try:
                    if not self._if_ours(lambda pipe: pipe.pexpire(self.key, self._ms())):
                        self.lost = True
                        log.error("claim %s was lost while held", self.key)
                        return
                except redis.RedisError as exc:
                    log.warning("claim %s not renewed: %s", self.key, type(exc).__name__)

        thread = threading.Thread(target=renew, name="imagebatch-claim", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def submitted(self, record: dict[str, Any], ttl_s: int) -> bool:
        value = json.dumps({**self.value, **record, "state": "submitted", "at": now_iso()})
        return self._if_ours(lambda pipe: pipe.set(self.key, value, ex=ttl_s))

    def release(self) -> None:
        with contextlib.suppress(redis.RedisError):  # the lease ends it anyway
            self._if_ours(lambda pipe: pipe.delete(self.key))

    def _ms(self) -> int:
        return int(self.lease_s * 1000)

    def _if_ours(self, write: Callable[[Any], object]) -> bool:
        """Compare-and-write on the claim's owner (WATCH/MULTI: no Lua file of our own)."""
        with self.client.pipeline() as pipe:
            try:
                pipe.watch(self.key)
                current = cast("str | None", pipe.get(self.key))  # WATCHing: runs at once
                if not current or json.loads(current).get("owner") != self.token:
                    return False
                pipe.multi()
                write(pipe)
                pipe.execute()
                return True
            except redis.WatchError:
                return False


# --- one pass --------------------------------------------------------------------------------
