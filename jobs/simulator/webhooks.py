"""APIFrame webhooks (docs/providers.md, "APIFrame: webhooks"): signed POSTs of a job's events,
sent on a timer.

Deliveries wait in a heap ordered by due time, served by a few daemon threads, so a slow or
dead receiver delays only its own deliveries. Each POST has a short timeout, follows no
redirect, and is retried with exponential backoff on a connection error or a non-2xx answer;
the job's ``webhookStatus`` and the ledger's ``webhooks`` counts show how it went.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from jobs.simulator.core import iso_ms, number
from jobs.simulator.state import Job, State, Webhook

logger = logging.getLogger(__name__)
EVENTS = ("progress", "completed", "failed")
SENDERS = 4
PROGRESS_AT = 0.6
"""Share of a job's duration at which its one ``progress`` event goes (halfway in PROCESSING)."""
DUPLICATE_DELAY_S = 0.05
USER_AGENT = "imagebatch-simulator-webhooks/1"


def signing_key(api_key: str) -> bytes:
    """The HMAC key: the raw 32-byte SHA-256 digest of the API key (as the official SDK)."""
    return hashlib.sha256(api_key.encode()).digest()


def signature(api_key: str, body: bytes) -> str:
    """``X-Webhook-Signature``: ``sha256=`` + hex HMAC-SHA256 of the raw body."""
    return "sha256=" + hmac.new(signing_key(api_key), body, hashlib.sha256).hexdigest()


def payload(job: Job, event: str, at: float, result_shape: str) -> dict[str, Any]:
    """The event's JSON body, as of monotonic time ``at``; ``error`` only on ``failed``."""
    status = "PROCESSING" if event == "progress" else job.status(at)
    done = status in ("COMPLETED", "FAILED")
    body: dict[str, Any] = {
        "event": event,
        "jobId": job.id,
        "status": status,
        "progress": job.progress(at),
        "result": job.result(result_shape) if status == "COMPLETED" else None,
        "model": job.model,
        "creditCost": number(job.credit_cost(at)),
        "completedAt": iso_ms(job.completed_ms) if done else None,
    }
    if event == "failed":
        body["error"] = job.failure
    return body


@dataclass(order=True)
class _Delivery:
    due: float
    seq: int
    job: Job = field(compare=False)
    event: str = field(compare=False)
    at: float = field(compare=False)
    """When the event happened (monotonic): the payload is as of then, for every copy."""
    generation: int = field(compare=False)
    dropped: bool = field(compare=False, default=False)
    attempt: int = field(compare=False, default=1)
    body: bytes | None = field(compare=False, default=None)
    """Built at the first attempt; retries resend the very same bytes."""


class Webhooks:
    """The delivery queue of one simulator: ``schedule`` jobs, ``start``/``stop``/``reset`` it."""

    def __init__(self, state: State) -> None:
        self.state = state
        self._cond = threading.Condition()
        self._heap: list[_Delivery] = []
        self._seq = itertools.count()
        self._generation = 0
        self._running = False
        self._threads: list[threading.Thread] = []
        self._client: httpx.Client | None = None

    def start(self) -> None:
        with self._cond:
            if self._running:
                return
            self._running = True
            self._client = httpx.Client(follow_redirects=False, trust_env=False)
            self._threads = [
                threading.Thread(target=self._serve, name=f"simulator-webhooks-{i}", daemon=True)
                for i in range(SENDERS)
            ]
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Drop what is pending and wait (at most one delivery timeout) for the senders."""
        with self._cond:
            if not self._running:
                return
            self._running = False
            self._generation += 1
            self._heap.clear()
            self._cond.notify_all()
            threads, client = self._threads, self._client
            self._threads, self._client = [], None
        for thread in threads:
            thread.join(timeout=self.state.config.webhook_timeout_s + 1)
        if client is not None:
            client.close()

    def reset(self) -> None:
        """Forget every pending delivery; one already on the wire is not counted."""
        with self._cond:
            self._generation += 1
            self._heap.clear()

    def schedule(self, job: Job) -> None:
        """Queue the job's events: ``progress`` halfway, ``completed``/``failed`` at its end."""
        hook = job.webhook
        if hook is None:
            return
        events = self._events(job, hook)
        if not events:
            return
        dropped = self.state.fault("webhook_drop")
        copies = 2 if not dropped and self.state.fault("webhook_duplicate") else 1
        with self.state.lock:
            hook.expected = {event for event, _ in events}
            hook.outstanding = len(events) * copies
            hook.status = "pending"
        with self._cond:
            for (event, at), copy in itertools.product(events, range(copies)):
                delivery = _Delivery(
                    at + copy * DUPLICATE_DELAY_S,
                    next(self._seq),
                    job,
                    event,
                    at,
                    self._generation,
                    dropped=dropped,
                )
                heapq.heappush(self._heap, delivery)
            self._cond.notify()

    @staticmethod
    def _events(job: Job, hook: Webhook) -> list[tuple[str, float]]:
        events = []
        if "progress" in hook.events:
            events.append(("progress", job.created + PROGRESS_AT * job.duration))
        end = "failed" if job.failure else "completed"
        if not job.never_finish and end in hook.events:
            events.append((end, job.ends))
        return events

    def _serve(self) -> None:
        while True:
            with self._cond:
                while True:
                    if not self._running:
                        return
                    now = time.monotonic()
                    if self._heap and self._heap[0].due <= now:
                        delivery = heapq.heappop(self._heap)
                        break
                    self._cond.wait(self._heap[0].due - now if self._heap else None)
                client = self._client
            if client is not None:
                self._deliver(client, delivery)

    def _deliver(self, client: httpx.Client, delivery: _Delivery) -> None:
        job, config = delivery.job, self.state.config
        hook = job.webhook
        if hook is None or delivery.generation != self._generation:
            return
        if delivery.dropped:
            self.state.count_webhook("dropped")
            return
        if delivery.body is None:
            body = payload(job, delivery.event, delivery.at, config.result_shape)
            delivery.body = json.dumps(body, separators=(",", ":")).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            "X-Webhook-Event": delivery.event,
            "X-Webhook-Signature": signature(job.api_key, delivery.body),
        }
        self.state.count_webhook("sent")
        try:
            answer = client.post(
                hook.url, content=delivery.body, headers=headers, timeout=config.webhook_timeout_s
            )
            ok = 200 <= answer.status_code < 300
        except httpx.HTTPError as exc:
            logger.debug("webhook to %s failed: %s", hook.url, type(exc).__name__)
            ok = False
        if not ok and delivery.attempt <= config.webhook_retries:
            with self._cond:
                if delivery.generation == self._generation:
                    delivery.due = time.monotonic() + config.webhook_backoff_s * 2 ** (
                        delivery.attempt - 1
                    )
                    delivery.attempt += 1
                    heapq.heappush(self._heap, delivery)
                    self._cond.notify()
            return
        self._resolve(delivery, hook, ok)

    def _resolve(self, delivery: _Delivery, hook: Webhook, ok: bool) -> None:
        with self.state.lock:
            if delivery.generation != self._generation:
                return
            self.state.webhooks["delivered" if ok else "failed"] += 1
            if ok:
                hook.delivered.add(delivery.event)
            hook.outstanding -= 1
            if hook.outstanding == 0:
                hook.status = "delivered" if hook.delivered >= hook.expected else "failed"
