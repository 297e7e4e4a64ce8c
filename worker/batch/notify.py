"""Finish notifications: POST summary.json to ``IMAGEBATCH_NOTIFY_URL`` when a batch ends.

The body is the summary as compact JSON, signed with ``X-Imagebatch-Signature: sha256=<hex>``
(HMAC-SHA256 of the raw body with ``IMAGEBATCH_NOTIFY_SECRET``). Each notification carries an
``X-Imagebatch-Delivery`` id that stays the same across its retries, so a receiver that got a
retry of a delivery it already processed (its 2xx was lost) can drop it.

Delivery is retried with full-jitter backoff (``IMAGEBATCH_RETRY_BASE_S``/``_MAX_S``, honouring
``Retry-After``) on network errors, timeouts, 408, 429 and 5xx; any other answer is final. It is
bounded by ``ATTEMPTS`` *and* ``DEADLINE_S`` in total, and runs in a background thread, so a
slow or dead receiver never holds finalize up.

A process that exits right after finalize (``imagebatch run`` does) would kill that thread:
an ``atexit`` hook gives pending deliveries up to ``EXIT_WAIT_S`` more (retrying without long
pauses) and logs the ones it had to give up. Logs name the receiver by scheme and host only:
a notify URL's path or query is often its secret (Slack-style webhook URLs).
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from jobs import policy
from jobs.providers import http
from jobs.settings import CoreSettings

log = logging.getLogger(__name__)

ATTEMPTS = 6
DEADLINE_S = 120.0
"""Total time one notification may take, retries and waits included."""
ATTEMPT_TIMEOUT_S = 10.0
"""One POST: how long the receiver may take to answer (5 s of it at most to connect)."""
EXIT_WAIT_S = 15.0
"""At interpreter exit, how long pending deliveries may still take (bounded, never forever)."""
EXIT_PAUSE_S = 0.5
"""Between retries once the process is exiting: no time left for the full backoff."""
RETRIED = frozenset({408, 425, 429}) | frozenset(range(500, 600))

_pending: set[threading.Thread] = set()
_pending_lock = threading.Lock()
_exiting = threading.Event()


def sign(body: bytes, secret: str) -> str:
    """The ``X-Imagebatch-Signature`` value of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(body: bytes, secret: str, signature: str | None) -> bool:
    """What a receiver checks: the header matches the body (constant-time comparison)."""
    return signature is not None and hmac.compare_digest(sign(body, secret), signature)


def where(url: str) -> str:
    """The receiver as logs may show it: scheme, host and port, nothing that may be secret."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "an invalid IMAGEBATCH_NOTIFY_URL"
    return f"{parts.scheme}://{host}{port}"


def encode(settings: CoreSettings, summary: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
    """The request body and headers of one notification (signed when a secret is set)."""
    body = json.dumps(summary, separators=(",", ":"), sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "imagebatch-notify/1",
        "X-Imagebatch-Event": "batch.finished",
        "X-Imagebatch-Delivery": uuid.uuid4().hex,
        "X-Imagebatch-Batch": str(summary.get("batch_id", "")),
    }
    if settings.notify_secret is not None:
        headers["X-Imagebatch-Signature"] = sign(body, settings.notify_secret.get_secret_value())
    return body, headers


def send(
    settings: CoreSettings,
    summary: dict[str, Any],
    attempts: int = ATTEMPTS,
    *,
    deadline_s: float = DEADLINE_S,
    transport: httpx.BaseTransport | None = None,
) -> bool:
    """POST the summary until the receiver answers 2xx; True once it did.

    Never raises: a notification that cannot be delivered is logged (without the URL's path,
    query or the secret), because the batch itself is done and stored either way.
    """
    url = settings.notify_url
    if not url:
        return False
    batch = summary.get("batch_id", "?")
    receiver = where(url)
    if not _usable(settings, url, batch, receiver):
        return False
    body, headers = encode(settings, summary)
    ends = time.monotonic() + deadline_s
    try:
        with httpx.Client(follow_redirects=False, transport=transport) as client:
            post = _Post(client, url, body, headers, batch, receiver)
            for attempt in range(1, attempts + 1):
                left = ends - time.monotonic()
                if left <= 0:
                    break
                timeout = httpx.Timeout(min(ATTEMPT_TIMEOUT_S, left), connect=min(5.0, left))
                delivered, retry_after = post.once(attempt, timeout)
                if delivered is not None:
                    return delivered
                if attempt == attempts:
                    break
                wait = policy.retry_wait(
                    attempt, settings.retry_base_s, settings.retry_max_s, retry_after
                )
                if time.monotonic() + wait >= ends:
                    break
                _pause(wait)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # a URL httpx cannot use at all
        log.error("batch %s: IMAGEBATCH_NOTIFY_URL is unusable: %s", batch, type(exc).__name__)
        return False
    log.warning(
        "batch %s: the finish notification to %s was not delivered (summary.json has it)",
        batch,
        receiver,
    )
    return False


def _usable(settings: CoreSettings, url: str, batch: Any, receiver: str) -> bool:
    """An http(s) URL (said once if not); an unsigned notification is sent, with a warning."""
    if urlsplit(url).scheme not in ("http", "https"):
        log.error("IMAGEBATCH_NOTIFY_URL must start with http:// or https:// (not %s)", receiver)
        return False
    if settings.notify_secret is None:
        log.warning(
            "batch %s: notifying %s unsigned: set IMAGEBATCH_NOTIFY_SECRET so the receiver "
            "can verify X-Imagebatch-Signature",
            batch,
            receiver,
        )
    return True


@dataclass(frozen=True)
class _Post:
    """The notification's POST, as each try sends it."""

    client: httpx.Client
    url: str
    body: bytes
    headers: dict[str, str]
    batch: Any
    receiver: str

    def once(self, attempt: int, timeout: httpx.Timeout) -> tuple[bool | None, float | None]:
        """One try: (True, _) delivered, (False, _) refused and not retried, (None, the
        answer's Retry-After or None) to try again."""
        batch, receiver = self.batch, self.receiver
        try:
            response = self.client.post(
                self.url, content=self.body, headers=self.headers, timeout=timeout
            )
        except httpx.TransportError as exc:
            log.warning(
                "batch %s: notify %s failed (try %d): %s",
                batch,
                receiver,
                attempt,
                type(exc).__name__,
            )
            return None, None
        if response.is_success:
            log.info("batch %s: notified %s", batch, receiver)
            return True, None
        if response.status_code not in RETRIED:
            log.warning(
                "batch %s: notify %s answered %d: not retried",
                batch,
                receiver,
                response.status_code,
            )
            return False, None
        log.warning(
            "batch %s: notify %s answered %d (try %d)",
            batch,
            receiver,
            response.status_code,
            attempt,
        )
        return None, http.retry_after(response)


def send_later(settings: CoreSettings, summary: dict[str, Any]) -> threading.Thread:
    """``send`` in a background thread; the process waits for it (briefly) at exit."""
    thread = threading.Thread(
        target=_deliver, args=(settings, summary), name="imagebatch-notify", daemon=True
    )
    with _pending_lock:
        _pending.add(thread)
    thread.start()
    return thread


def wait_pending(timeout: float) -> bool:
    """Wait up to ``timeout`` seconds for every pending delivery; True if none is left."""
    ends = time.monotonic() + timeout
    with _pending_lock:
        threads = list(_pending)
    for thread in threads:
        thread.join(max(0.0, ends - time.monotonic()))
    with _pending_lock:
        return not any(thread.is_alive() for thread in _pending)


def _deliver(settings: CoreSettings, summary: dict[str, Any]) -> None:
    try:
        send(settings, summary)
    except Exception:  # a thread's exception would only reach stderr as a bare traceback
        log.exception("batch %s: the finish notification failed", summary.get("batch_id", "?"))
    finally:
        with _pending_lock:
            _pending.discard(threading.current_thread())


def _pause(seconds: float) -> None:
    """Back off; once the process is exiting, only a short pause is left."""
    if _exiting.wait(seconds):
        time.sleep(EXIT_PAUSE_S)


@atexit.register
def _at_exit() -> None:
    """``imagebatch run`` exits right after finalize: let its notification go out first."""
    with _pending_lock:
        if not _pending:
            return
    _exiting.set()
    if not wait_pending(EXIT_WAIT_S):
        log.warning(
            "exiting with a finish notification not yet delivered (receiver slow or down); "
            "the batch's summary.json has everything it would have said"
        )
