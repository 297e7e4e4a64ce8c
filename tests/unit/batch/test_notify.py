"""Finish notifications against a real receiver: an ``http.server`` on 127.0.0.1 in the test.

What a receiver relies on: the signature verifies over the exact body, a retry is the same
delivery (same body, same ``X-Imagebatch-Delivery``), a 5xx is retried until it lands, a 4xx
is final, a receiver that hangs never holds the caller up. (That ``imagebatch run``, which
exits right after finalize, still delivers its batch's summary: ``tests/e2e``.)
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import pytest

from jobs.settings import CoreSettings, Settings
from tests.receivers import SECRET
from worker.batch import notify

SUMMARY = {"batch_id": "b-1", "total": 3, "succeeded": 2, "failed": 1, "rejected": 0}


def settings_for(url: str, secret: str | None = SECRET, **more: Any) -> CoreSettings:
    values: dict[str, Any] = {"notify_url": url, "retry_base_s": 0.01, "retry_max_s": 0.05}
    if secret is not None:
        values["notify_secret"] = secret
    return Settings(_env_file=None, **(values | more))  # type: ignore[call-arg]


def test_the_signature_verifies_over_the_exact_body(receiver: Any) -> None:
    rx = receiver(204)
    assert notify.send(settings_for(rx.url), SUMMARY) is True
    (got,) = rx.requests
    assert json.loads(got.body) == SUMMARY
    signature = got.headers["X-Imagebatch-Signature"]
    assert signature.startswith("sha256=")
    assert notify.verify(got.body, SECRET, signature)
    assert not notify.verify(got.body + b" ", SECRET, signature)
    assert not notify.verify(got.body, "another-secret", signature)
    assert got.headers["Content-Type"] == "application/json"
    assert got.headers["X-Imagebatch-Event"] == "batch.finished"
    assert got.headers["X-Imagebatch-Batch"] == "b-1"


def test_a_500_is_retried_and_the_same_delivery_then_lands(
    receiver: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rx = receiver(500, 503, 200)
    with caplog.at_level(logging.INFO, logger="worker.batch.notify"):
        assert notify.send(settings_for(rx.url), SUMMARY) is True
    assert len(rx.requests) == 3
    assert len({r.body for r in rx.requests}) == 1
    assert len({r.headers["X-Imagebatch-Delivery"] for r in rx.requests}) == 1
    assert all(
        notify.verify(r.body, SECRET, r.headers["X-Imagebatch-Signature"]) for r in rx.requests
    )
    # Logs name the receiver by host only: the path of a webhook URL is often its secret.
    assert "answered 500" in caplog.text and "notified http://127.0.0.1:" in caplog.text
    assert "tok3n-secret-path" not in caplog.text and SECRET not in caplog.text


def test_a_4xx_is_final_and_retries_are_bounded(receiver: Any) -> None:
    rejected = receiver(400)
    assert notify.send(settings_for(rejected.url), SUMMARY) is False
    assert len(rejected.requests) == 1
    down = receiver(500)
    assert notify.send(settings_for(down.url), SUMMARY, attempts=3) is False
    assert len(down.requests) == 3


def test_a_receiver_that_hangs_does_not_block_the_caller(receiver: Any) -> None:
    rx = receiver("hang")
    started = time.monotonic()
    thread = notify.send_later(settings_for(rx.url), SUMMARY)
    assert time.monotonic() - started < 0.5
    rx.wait_for(1)
    assert thread.is_alive()  # still waiting for the receiver, in the background
    # And on its own it gives up within its deadline, not never.
    started = time.monotonic()
    assert notify.send(settings_for(rx.url), SUMMARY, deadline_s=1.0) is False
    assert time.monotonic() - started < 3.0


def test_at_exit_pending_deliveries_get_a_bounded_wait(
    receiver: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    slow = receiver(500, 200)
    notify.send_later(settings_for(slow.url, retry_base_s=5.0, retry_max_s=5.0), SUMMARY)
    slow.wait_for(1)
    started = time.monotonic()
    notify._at_exit()  # the 5 s backoff is cut short: the retry lands before exit
    assert len(slow.requests) == 2 and time.monotonic() - started < 3.0
    notify._exiting.clear()

    hung = receiver("hang")
    monkeypatch.setattr(notify, "EXIT_WAIT_S", 0.5)
    notify.send_later(settings_for(hung.url), SUMMARY)
    hung.wait_for(1)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="worker.batch.notify"):
        notify._at_exit()
    assert time.monotonic() - started < 1.5
    assert "not yet delivered" in caplog.text


def test_without_a_secret_it_is_sent_unsigned_with_a_warning(
    receiver: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rx = receiver(200)
    with caplog.at_level(logging.WARNING, logger="worker.batch.notify"):
        assert notify.send(settings_for(rx.url, secret=None), SUMMARY) is True
    assert "X-Imagebatch-Signature" not in rx.requests[0].headers
    assert "set IMAGEBATCH_NOTIFY_SECRET" in caplog.text


def test_an_unusable_url_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="worker.batch.notify"):
        assert notify.send(settings_for("ftp://127.0.0.1/x"), SUMMARY) is False
        assert notify.send(settings_for("http://"), SUMMARY) is False
    assert "IMAGEBATCH_NOTIFY_URL" in caplog.text
