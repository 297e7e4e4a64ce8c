"""The simulator's HTTP transport: a listener (a bound port and the thread serving it), the
threading server that can cut its open connections (a provider that crashed), and the request
handler that reads a request, hands it to the simulator and writes its answer: whole,
streamed, truncated, or not at all (a dropped connection).
"""

from __future__ import annotations

import logging
import socket
import threading
import uuid
from contextlib import suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit

from jobs.simulator.config import SimulatorConfig
from jobs.simulator.core import Request, Response, json_response
from jobs.simulator.openai_files import MAX_UPLOAD, UPLOAD_PATH

logger = logging.getLogger(__name__)
MAX_BODY = 20 * 1024 * 1024


class Serves(Protocol):
    """What a listener serves: the simulator."""

    @property
    def config(self) -> SimulatorConfig: ...

    def handle(self, req: Request, only: str | None = None) -> Response: ...


def http_url(host: str, port: int) -> str:
    return f"http://{host if host not in ('', '0.0.0.0') else '127.0.0.1'}:{port}"


@dataclass
class Listener:
    """One bound port and the thread serving it: the main one, or a provider's own."""

    server: Server
    thread: threading.Thread

    @classmethod
    def open(cls, simulator: Serves, port: int, provider: str | None = None) -> Listener:
        server = Server((simulator.config.host, port), simulator, provider)
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"imagebatch-simulator:{server.server_address[1]}",
            daemon=True,
        )
        thread.start()
        return cls(server, thread)

    @property
    def port(self) -> int:
        port: int = self.server.server_address[1]
        return port

    def close(self) -> None:
        """Stop accepting (new connections are refused) and cut the open ones."""
        self.server.shutdown()
        self.server.close_connections()
        self.server.server_close()
        self.thread.join(timeout=5)


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(
        self, address: tuple[str, int], simulator: Serves, provider: str | None = None
    ) -> None:
        super().__init__(address, Handler)
        self.simulator = simulator
        self.provider = provider
        """The one provider this listener serves (a dedicated port), None for all."""
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def close_connections(self) -> None:
        with self.connections_lock:
            for conn in self.connections:
                with suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("simulator connection error from %s", client_address, exc_info=True)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 120
    disable_nagle_algorithm = True
    server: Server

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
        fallback = http_url(self.server.simulator.config.host, self.server.server_address[1])
        host = self.headers.get("Host") or fallback.removeprefix("http://")
        req = Request(
            method=self.command,
            path=url.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=self.rfile.read(length) if length else b"",
            query=dict(parse_qsl(url.query)),
            base_url=f"http://{host}",
        )
        self._send(self.server.simulator.handle(req, self.server.provider), request_id)

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
