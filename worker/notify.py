"""Finish notifications: POST summary.json to ``IMAGEBATCH_NOTIFY_URL`` when a batch ends.

The body is signed (``X-Imagebatch-Signature: sha256=<hex>``, HMAC-SHA256 of the raw body with
``IMAGEBATCH_NOTIFY_SECRET``), retried with backoff on errors and 5xx, and sent from a
background thread so that a slow or dead receiver never holds finalize up.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from typing import Any

import httpx

from jobs import policy
from jobs.settings import CoreSettings

log = logging.getLogger(__name__)
ATTEMPTS = 6


def sign(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def send(settings: CoreSettings, summary: dict[str, Any], attempts: int = ATTEMPTS) -> bool:
    """POST the summary; True once the receiver answered 2xx."""
    url = settings.notify_url
    if not url:
        return False
    body = json.dumps(summary, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "X-Imagebatch-Event": "batch.finished"}
    if settings.notify_secret is not None:
        headers["X-Imagebatch-Signature"] = sign(body, settings.notify_secret.get_secret_value())
    for attempt in range(1, attempts + 1):
        try:
            response = httpx.post(url, content=body, headers=headers, timeout=10.0)
            if response.status_code < 300:
                return True
            retry = response.status_code >= 500 or response.status_code == 429
            log.warning("notify %s answered %s", url, response.status_code)
            if not retry:
                return False
        except httpx.HTTPError as exc:
            log.warning("notify %s failed: %s", url, type(exc).__name__)
        time.sleep(policy.backoff(attempt, 1.0, 30.0))
    return False


def send_later(settings: CoreSettings, summary: dict[str, Any]) -> threading.Thread:
    thread = threading.Thread(
        target=send, args=(settings, summary), name="imagebatch-notify", daemon=True
    )
    thread.start()
    return thread
