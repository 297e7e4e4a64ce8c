"""``imagebatch webhook``: receives APIFrame's job webhooks and advances the lines they name.

A delivery is trusted only with a valid ``X-Webhook-Signature`` (HMAC-SHA256 of the raw body,
keyed by the raw SHA-256 digest of the API key, compared in constant time). It then changes a
line only if that line is still waiting for exactly that job: a forged delivery is refused
(401), and a replayed or stale one (unknown job, line already past it) changes nothing.
Polling stays on, at a long interval, for the webhook that never comes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from jobs.errors import ImagebatchError, JobFailed, TransientProviderError
from jobs.providers.apiframe import job_outcome
from jobs.providers.base import Finished
from jobs.settings import WEBHOOK_PATH
from worker import transitions
from worker.celery import tasks
from worker.lines import steps
from worker.lines.records import LineStatus
from worker.runtime import Runtime

MAX_BODY = 1024 * 1024
EVENT_STATUS = {"completed": "COMPLETED", "failed": "FAILED", "progress": "PROCESSING"}
"""A delivery's ``event``, as the job status it reports (the body's ``status`` otherwise)."""
log = logging.getLogger(__name__)


def signature(body: bytes, api_key: str) -> str:
    return hmac.new(hashlib.sha256(api_key.encode()).digest(), body, hashlib.sha256).hexdigest()


def verified(body: bytes, header: str | None, api_key: str) -> bool:
    if not header:
        return False
    given = header.strip().removeprefix("sha256=")
    return hmac.compare_digest(given.encode(), signature(body, api_key).encode())


class Receiver:
    """Checks and applies one delivery; the HTTP server around it is ``serve``."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def providers(self) -> list[tuple[str, str]]:
        """(provider, key) of every provider that can send webhooks and has a key."""
        found = []
        for name in self.rt.settings.provider_names():
            config = self.rt.settings.provider_config(name)
            if config.api_key is None or not config.base_url:
                continue
            try:
                adapter = self.rt.provider(name)
            except ImagebatchError:
                continue  # a provider we cannot build sends us nothing
            if adapter.webhooks:
                found.append((name, config.api_key.get_secret_value()))
        return found

    def handle(self, body: bytes, signature_header: str | None) -> tuple[int, str]:
        provider = next(
            (name for name, key in self.providers() if verified(body, signature_header, key)),
            None,
        )
        if provider is None:
            return 401, "bad signature"
        try:
            payload = json.loads(body)
            job_id = str(payload["jobId"])
            event = str(payload.get("event") or payload.get("status", "")).lower()
        except (ValueError, KeyError, TypeError):
            return 400, "not a webhook body"
        found = self.rt.state.line_of_job(provider, job_id)
        if found is None:
            return 200, "unknown job: ignored"
        batch, idx = found
        rec = self.rt.state.read(batch, idx)
        if rec is None or rec.status is not LineStatus.SUBMITTED or rec.job_id != job_id:
            return 200, "stale: ignored"
        meta = self.rt.state.batch(batch)
        ctx = self.rt.context(meta)
        status = EVENT_STATUS.get(event, str(payload.get("status", "")).upper())
        try:
            outcome = job_outcome({**payload, "status": status}, job_id, provider)
        except JobFailed as exc:
            t = steps.failed_by_webhook(ctx, rec, exc)
        except TransientProviderError:
            return 200, "no result yet: ignored"
        else:
            if not isinstance(outcome, Finished):
                return 200, "progress noted"
            t = steps.finished_by_webhook(ctx, rec, outcome)
        applied = transitions.apply(self.rt, rec, t, meta=meta, index_jobs=True)
        if applied.last:
            tasks.send_finalize(batch)
        return 200, "applied" if applied.applied else "stale: ignored"


def serve(rt: Runtime, host: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server for ``WEBHOOK_PATH``, serving in a daemon thread until ``shutdown()``."""
    receiver = Receiver(rt)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            refusal = None
            if self.path.split("?")[0] != WEBHOOK_PATH:
                refusal = (404, "not found")
            elif length > MAX_BODY:
                refusal = (413, "too large")
            if refusal is not None:
                # The unread body would be taken for the next request on a kept-alive
                # connection: close it after answering.
                self.close_connection = True
                self._answer(*refusal)
                return
            body = self.rfile.read(length)
            try:
                status, text = receiver.handle(body, self.headers.get("X-Webhook-Signature"))
            except Exception:
                log.exception("webhook delivery failed")
                status, text = 500, "error"
            self._answer(status, text)

        def do_GET(self) -> None:
            self._answer(200 if self.path == "/healthz" else 404, "ok")

        def _answer(self, status: int, text: str) -> None:
            data = json.dumps({"status": text}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("webhook: " + format, *args)

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="imagebatch-webhook", daemon=True).start()
    return server
