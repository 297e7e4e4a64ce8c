"""The HTTP server: routing, rate limit, fault draws, auth, and the ``/_sim`` control API.

Everything runs on stdlib ``ThreadingHTTPServer`` daemon threads, so a test or the CLI can
start a simulator in-process on a free port and the real adapters talk HTTP to it.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self
from urllib.parse import parse_qsl, urlsplit

from jobs.simulator.apiframe import ApiFrame
from jobs.simulator.config import SimulatorConfig
from jobs.simulator.core import (
    PROVIDERS,
    Handler,
    Request,
    Response,
    Surface,
    error_response,
    json_response,
)
from jobs.simulator.images import ImageCache, serve_cdn
from jobs.simulator.openai_batch import MAX_UPLOAD, UPLOAD_PATH, Batches, Combined
from jobs.simulator.openai_style import DIALECTS, SyncSurface
from jobs.simulator.state import State
from jobs.simulator.webhooks import Webhooks

logger = logging.getLogger(__name__)
MAX_BODY = 20 * 1024 * 1024


def _not_found() -> Response:
    return json_response(404, {"error": "Not found"})


class Simulator:
    """Five image APIs on one local port: APIFrame at ``/``, the others under ``/{provider}``.

    Use as a context manager (``with Simulator(SimulatorConfig(latency_s=0.2)) as sim:``) or
    call ``start()``/``stop()``. Settings can change while running via ``update(**changes)``.
    """

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self._state = State(config or SimulatorConfig())
        self._cache = ImageCache()
        self._webhooks = Webhooks(self._state)
        sync = {d.provider: SyncSurface(d, self._state, self._cache) for d in DIALECTS}
        apiframe = ApiFrame(self._state, self._webhooks)
        self._batches = Batches(self._state)
        openai = Combined(sync["openai"], self._batches)
        self._surfaces: dict[str, Surface] = {"apiframe": apiframe, **sync, "openai": openai}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def config(self) -> SimulatorConfig:
        return self._state.config

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``; raises ``RuntimeError`` before ``start()``."""
        if self._server is None:
            raise RuntimeError("the simulator is not running; call start() first")
        host = self.config.host if self.config.host not in ("", "0.0.0.0") else "127.0.0.1"
        return f"http://{host}:{self._server.server_address[1]}"

    def url_for(self, provider: str) -> str:
        """The base URL to configure for ``provider`` (``simulator`` is APIFrame)."""
        if provider in ("apiframe", "simulator"):
            return self.base_url
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; one of {', '.join(PROVIDERS)}")
        return f"{self.base_url}/{provider}"

    def start(self) -> Self:
        """Bind (port 0 picks a free one) and serve in a daemon thread."""
        if self._server is not None:
            raise RuntimeError("the simulator is already running")
        self._state.stopping.clear()
        self._server = _Server((self.config.host, self.config.port), self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"imagebatch-simulator:{self._server.server_address[1]}",
            daemon=True,
        )
        self._thread.start()
        self._webhooks.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut open connections, as a crashed provider would."""
        server, self._server = self._server, None
        if server is None:
            return
        self._state.stopping.set()
        self._webhooks.stop()
        server.shutdown()
        server.close_connections()
        server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def serve_forever(self) -> None:
        """Start (if needed) and block until ``stop()`` or Ctrl-C; for ``imagebatch simulate``."""
        if self._server is None:
            self.start()
        try:
            while self._server is not None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            self.stop()

    def __enter__(self) -> Self:
        return self if self._server is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def ledger(self) -> dict[str, Any]:
        """Submits, replays, request counts, credits, 429s by cause, webhook deliveries and every
        billed job, OpenAI batch and batch request (``GET /_sim/ledger``)."""
        batches = self._batches.ledger()  # bills finished batch requests first
        return self._state.ledger() | batches

    def reset(self) -> None:
        """Forget jobs, charges, idempotency keys, limits and pending webhooks; re-seed the RNG."""
        self._webhooks.reset()
        self._state.reset()
        self._batches.reset()
        self._cache.clear()

    def update(self, **changes: Any) -> SimulatorConfig:
        """Change settings at runtime; ``faults`` may be a ``Faults`` or a partial dict."""
        if self._server is not None and {"host", "port"} & changes.keys():
            raise ValueError("host and port cannot change while the simulator is running")
        return self._state.update(changes)

    def _dispatch(self, req: Request) -> tuple[str | None, Response]:
        """Answer one request; the label (route template) is what the ledger counts."""
        if req.path.startswith("/_sim/"):
            return None, self._control(req)
        if req.path.startswith("/cdn/images/"):
            if req.method != "GET":
                return None, _not_found()
            name = req.path.removeprefix("/cdn/images/")
            return "GET /cdn/images/{name}", serve_cdn(self._state, self._cache, req, name)
        head, _, tail = req.path.lstrip("/").partition("/")
        if head in self._surfaces and head != "apiframe":
            surface, path = self._surfaces[head], "/" + tail
        else:
            surface, path = self._surfaces["apiframe"], req.path
        match = surface.route(req.method, path)
        if match is None:
            return f"{req.method} (unknown)", _not_found()
        label, handler = match
        return label, self._guarded(surface, req, handler)

    def handle(self, req: Request) -> Response:
        """Route and answer, then count the outcome (status, dropped or truncated) in the ledger."""
        try:
            label, response = self._dispatch(req)
        except Exception:
            logger.exception("simulator failed on %s %s", req.method, req.path)
            label, response = None, json_response(500, {"error": "Internal simulator error"})
        if label is not None:
            cut = response.truncate_to is not None
            outcome = "dropped" if response.drop else "truncated" if cut else response.status
            self._state.record(f"{label} {outcome}")
        return response

    def _guarded(self, surface: Surface, req: Request, handler: Handler) -> Response:
        state, name = self._state, surface.provider
        if state.fault("error_5xx"):
            return error_response(name, "unavailable", "Service unavailable")
        if state.fault("error_429"):
            state.count_429(name, "fault")
            return error_response(name, "rate_limit", "Too many requests", retry_after=1)
        wait = state.take_token(name)
        if wait is not None:
            state.count_429(name, "rate")
            return error_response(name, "rate_limit", "Rate limit exceeded", retry_after=wait)
        refusal = surface.authenticate(req)
        if refusal is not None:
            return refusal
        if state.fault("slow"):
            time.sleep(state.config.faults.slow_s)
        return handler(req)

    def _control(self, req: Request) -> Response:
        route = (req.method, req.path)
        if route == ("GET", "/_sim/health"):
            return json_response(200, {"status": "ok"})
        if route == ("GET", "/_sim/ledger"):
            return json_response(200, self.ledger())
        if route == ("POST", "/_sim/reset"):
            self.reset()
            return json_response(200, {"status": "reset"})
        if route == ("GET", "/_sim/config"):
            return json_response(200, self.config.to_dict())
        if route == ("POST", "/_sim/config"):
            try:
                changes = req.json()
                if not isinstance(changes, dict):
                    raise ValueError("the body must be a JSON object of settings")
                return json_response(200, self.update(**changes).to_dict())
            except ValueError as exc:
                return json_response(400, {"error": str(exc)})
        return _not_found()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], simulator: Simulator) -> None:
        super().__init__(address, _Handler)
        self.simulator = simulator
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def close_connections(self) -> None:
        with self.connections_lock:
            for conn in self.connections:
                with suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("simulator connection error from %s", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120
    disable_nagle_algorithm = True
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.connections_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.connections_lock:
            self.server.connections.discard(self.connection)
        with suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("simulator: " + format, *args)

    def _handle(self) -> None:
        request_id = f"req_{uuid.uuid4().hex}"
        length = int(self.headers.get("Content-Length") or 0)
        url = urlsplit(self.path)
        refusal = None
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            refusal = json_response(411, {"error": "Content-Length is required"})
        elif length > (MAX_UPLOAD if url.path == UPLOAD_PATH else MAX_BODY):
            refusal = json_response(413, {"error": "Request body too large"})
        if refusal is not None:
            self.close_connection = True
            self._send(refusal, request_id)
            return
        host = self.headers.get("Host") or self.server.simulator.base_url.removeprefix("http://")
        req = Request(
            method=self.command,
            path=url.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
            query=dict(parse_qsl(url.query)),
            base_url=f"http://{host}",
        )
        self._send(self.server.simulator.handle(req), request_id)

    def _send(self, response: Response, request_id: str) -> None:
        body, cut = response.body, response.truncate_to
        if response.drop:
            self._hang_up()
            return
        if response.stream is not None:
            self._send_chunked(response, request_id)
            return
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-request-id", request_id)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self._hang_up()

    def _send_chunked(self, response: Response, request_id: str) -> None:
        """Write the body as it is produced; a client that leaves mid-way just ends it."""
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("x-request-id", request_id)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        try:
            for chunk in response.stream or ():
                if chunk:
                    self.wfile.write(b"%x\r\n" % len(chunk))
                    self.wfile.write(chunk)
                    self.wfile.write(b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            self.close_connection = True

    def _hang_up(self) -> None:
        self.close_connection = True
        with suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)
