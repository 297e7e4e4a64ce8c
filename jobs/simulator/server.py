"""The simulator: routing, outages, rate limits, fault draws, auth, and the ``/_sim`` API.

Everything runs on stdlib ``ThreadingHTTPServer`` daemon threads (``listener``), so a test or
the CLI can start a simulator in-process on a free port and the real adapters talk HTTP to it.
With ``dedicated_ports`` each provider also has a listener of its own, which an outage can
close.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Self

from jobs.simulator.apiframe import ApiFrame
from jobs.simulator.config import SimulatorConfig
from jobs.simulator.core import (
    PROVIDERS,
    Handler,
    Request,
    Response,
    Surface,
    error_response,
    go_duration,
    json_response,
)
from jobs.simulator.dialects import DIALECTS
from jobs.simulator.images import ImageCache, serve_cdn
from jobs.simulator.listener import Listener, http_url
from jobs.simulator.openai_batch import Batches, Combined
from jobs.simulator.openai_style import SyncSurface
from jobs.simulator.state import Spend, State
from jobs.simulator.webhooks import Webhooks

logger = logging.getLogger(__name__)


_FIXED_AT_START = frozenset({"host", "port", "dedicated_ports"})


def _not_found() -> Response:
    return json_response(404, {"error": "Not found"})


def _ratelimit_headers(spend: Spend) -> dict[str, str]:
    """OpenAI's request-limit headers (docs/providers.md, "OpenAI: rate-limit headers") for
    the bucket ``spend`` drew on."""
    return {
        "x-ratelimit-limit-requests": str(round(spend.rps * 60)),
        "x-ratelimit-remaining-requests": str(spend.remaining),
        "x-ratelimit-reset-requests": go_duration(spend.full_in),
    }


class Simulator:
    """Five image APIs on one local port: APIFrame at ``/``, the others under ``/{provider}``
    (with ``dedicated_ports``, each also on a port of its own: ``url_for``, ``GET /_sim/urls``).

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
        self._main: Listener | None = None
        self._dedicated: dict[str, Listener] = {}
        self._ports: dict[str, int] = {}
        """Each provider's dedicated port, kept while an outage has its listener closed."""
        self._listeners_lock = threading.Lock()

    @property
    def config(self) -> SimulatorConfig:
        return self._state.config

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT``; raises ``RuntimeError`` before ``start()``."""
        if self._main is None:
            raise RuntimeError("the simulator is not running; call start() first")
        return http_url(self.config.host, self._main.port)

    def url_for(self, provider: str) -> str:
        """The base URL to configure for ``provider`` (``simulator`` is APIFrame): on the main
        port, or with ``dedicated_ports`` on the provider's own port (same paths);
        ``openai-batch`` is OpenAI's (the Batch API lives beside the Images API)."""
        if provider == "simulator":
            provider = "apiframe"
        if provider == "openai-batch":
            provider = "openai"
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; one of {', '.join(PROVIDERS)}")
        base = self.base_url
        if self.config.dedicated_ports:
            base = http_url(self.config.host, self._ports[provider])
        return base if provider == "apiframe" else f"{base}/{provider}"

    def start(self) -> Self:
        """Bind (port 0 picks a free one; each dedicated port is a free one) and serve in
        daemon threads."""
        if self._main is not None:
            raise RuntimeError("the simulator is already running")
        self._state.stopping.clear()
        self._main = Listener.open(self, self.config.port)
        with self._listeners_lock:
            self._sync_listeners()
        self._webhooks.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut open connections, as a crashed provider would."""
        main, self._main = self._main, None
        if main is None:
            return
        self._state.stopping.set()
        self._webhooks.stop()
        with self._listeners_lock:
            listeners, self._dedicated, self._ports = [main, *self._dedicated.values()], {}, {}
        for listener in listeners:
            listener.close()

    def serve_forever(self) -> None:
        """Start (if needed) and block until ``stop()`` or Ctrl-C; for ``imagebatch simulate``."""
        if self._main is None:
            self.start()
        try:
            while self._main is not None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            self.stop()

    def __enter__(self) -> Self:
        return self if self._main is not None else self.start()

    def __exit__(self, *exc: object) -> None:
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
        """Change settings at runtime; ``faults`` may be a ``Faults`` or a partial dict, and
        ``providers`` a partial dict per provider. An ``outage`` of ``refuse`` closes that
        provider's dedicated listener; clearing it binds the same port again."""
        moved = {
            k for k in _FIXED_AT_START & changes.keys() if changes[k] != getattr(self.config, k)
        }
        if self._main is not None and moved:
            names = ", ".join(sorted(_FIXED_AT_START))
            raise ValueError(f"{names} cannot change while the simulator is running")
        config = self._state.update(changes)
        if self._main is not None:
            with self._listeners_lock:
                self._sync_listeners()
        return config

    def _sync_listeners(self) -> None:
        """Open or close each provider's dedicated listener to match its ``outage``.

        A refused provider's port is still reserved at start (bound, then closed), so its URL
        is known and stays the same when the outage ends."""
        config = self.config
        if not config.dedicated_ports or self._main is None:
            return
        for provider in PROVIDERS:
            wanted = config.overrides(provider).outage != "refuse"
            listener = self._dedicated.pop(provider, None)
            if listener is None and (wanted or provider not in self._ports):
                listener = Listener.open(self, self._ports.get(provider, 0), provider)
                self._ports[provider] = listener.port
            if listener is not None and not wanted:
                listener.close()
            elif listener is not None:
                self._dedicated[provider] = listener

    def _dispatch(self, req: Request, only: str | None) -> tuple[str | None, Response]:
        """Answer one request; the label (route template) is what the ledger counts. ``only``:
        the provider a dedicated listener serves (its routes and its jobs' images, no more)."""
        if req.path.startswith("/_sim/"):
            return None, self._control(req) if only is None else _not_found()
        if req.path.startswith("/cdn/images/"):
            if req.method != "GET":
                return None, _not_found()
            name = req.path.removeprefix("/cdn/images/")
            response = serve_cdn(self._state, self._cache, req, name, provider=only)
            return "GET /cdn/images/{name}", response
        head, _, tail = req.path.lstrip("/").partition("/")
        if head in self._surfaces and head != "apiframe":
            surface, path = self._surfaces[head], "/" + tail
        else:
            surface, path = self._surfaces["apiframe"], req.path
        match = surface.route(req.method, path) if only in (None, surface.provider) else None
        if match is None:
            return f"{req.method} (unknown)", _not_found()
        label, handler = match
        return label, self._guarded(surface, req, handler, paid=handler == surface.generate)

    def handle(self, req: Request, only: str | None = None) -> Response:
        """Route and answer, then count the outcome (status, dropped or truncated) in the ledger."""
        try:
            label, response = self._dispatch(req, only)
        except Exception:
            logger.exception("simulator failed on %s %s", req.method, req.path)
            label, response = None, json_response(500, {"error": "Internal simulator error"})
        if label is not None:
            cut = response.truncate_to is not None
            outcome = "dropped" if response.drop else "truncated" if cut else response.status
            self._state.record(f"{label} {outcome}")
        return response

    def _guarded(self, surface: Surface, req: Request, handler: Handler, paid: bool) -> Response:
        """The provider's answer after its outage, faults, rate limit and auth; with
        ``ratelimit_headers``, the state of the bucket it draws on goes on every answer."""
        state, name = self._state, surface.provider
        extra = state.config.overrides(name)
        if extra.outage == "refuse":
            return Response(503, drop=True)
        if extra.extra_latency_s > 0:
            time.sleep(extra.extra_latency_s)
        response, spend = self._limited(surface, req, handler, paid)
        if state.config.ratelimit_headers:
            spend = spend or state.take_token(name, paid, spend=False)
            if spend is not None:
                response.headers.update(_ratelimit_headers(spend))
        return response

    def _limited(
        self, surface: Surface, req: Request, handler: Handler, paid: bool
    ) -> tuple[Response, Spend | None]:
        """The answer, and the draw on the rate-limit bucket if the request got that far."""
        state, name = self._state, surface.provider
        if state.config.overrides(name).outage == "503":
            return error_response(name, "unavailable", "Service unavailable"), None
        if state.fault("error_5xx"):
            return error_response(name, "unavailable", "Service unavailable"), None
        if state.fault("error_429"):
            state.count_429(name, "fault")
            return error_response(name, "rate_limit", "Too many requests", retry_after=1), None
        spend = state.take_token(name, paid)
        if spend is not None and spend.wait is not None:
            state.count_429(name, spend.cause)
            message = "Rate limit exceeded"
            return error_response(name, "rate_limit", message, retry_after=spend.wait), spend
        refusal = surface.authenticate(req)
        if refusal is not None:
            return refusal, spend
        if paid and state.fault("submit_429"):
            state.count_429(name, "fault")
            message = "The service is at capacity; please retry shortly"
            return error_response(name, "rate_limit", message, retry_after=1), spend
        if state.fault("slow"):
            time.sleep(state.config.faults.slow_s)
        return handler(req), spend

    def _control(self, req: Request) -> Response:
        route = (req.method, req.path)
        if route == ("GET", "/_sim/health"):
            return json_response(200, {"status": "ok"})
        if route == ("GET", "/_sim/urls"):
            return json_response(200, {p: self.url_for(p) for p in PROVIDERS})
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
