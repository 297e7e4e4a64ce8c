"""A real HTTP receiver for what imagebatch sends out (finish notifications): an
``http.server`` on 127.0.0.1, answering each POST as a test scripts it. Registered as the
``receiver`` fixture through ``pytest_plugins`` in ``conftest.py``."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from worker.batch import notify

SECRET = "whsec_test_0123456789abcdef"


Answer = int | str | tuple[float, int]


@dataclass
class Received:
    body: bytes
    headers: dict[str, str]
    path: str


@dataclass
class Receiver:
    """Answers each POST with the next scripted status (the last one repeats); ``"hang"``
    holds the request until the test ends, ``(seconds, status)`` answers late."""

    script: list[Answer]
    url: str = ""
    requests: list[Received] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def next_answer(self) -> Answer:
        index = min(len(self.requests) - 1, len(self.script) - 1)
        return self.script[index]

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.requests) >= count, timeout), (
                f"{len(self.requests)} of {count} requests arrived"
            )
            return list(self.requests)


@pytest.fixture
def receiver() -> Iterator[Any]:
    """A factory: ``receiver(200)``, ``receiver(500, 500, 200)``, ``receiver("hang")``."""
    servers: list[tuple[ThreadingHTTPServer, threading.Thread, Receiver]] = []

    def make(*script: Answer) -> Receiver:
        state = Receiver(list(script))

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with state.arrived:
                    state.requests.append(Received(body, dict(self.headers.items()), self.path))
                    answer = state.next_answer()
                    state.arrived.notify_all()
                if answer == "hang":
                    state.release.wait(30)
                    return
                if isinstance(answer, tuple):
                    state.release.wait(answer[0])
                    answer = answer[1]
                self.send_response(int(answer))
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        state.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/T0/B0/tok3n-secret-path"
        servers.append((server, thread, state))
        return state

    yield make
    for server, thread, state in servers:
        state.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert notify.wait_pending(10), "a notification thread outlived its test"
    notify._exiting.clear()
