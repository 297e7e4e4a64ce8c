"""``worker.services.webhook``: APIFrame's job webhooks advance exactly the line still waiting
for that job, and nothing else. Deliveries are checked through ``Receiver.handle`` (the
signature, the body, the line's state) and over HTTP, down to the simulator's own signed
deliveries."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry

from jobs.settings import WEBHOOK_PATH
from jobs.simulator import Simulator, SimulatorConfig
from tests.runtime_support import (
    BATCH,
    PROVIDER,
    put_line,
    record,
    runtime,
    seed_batch,
    settings,
)
from tests.servers import free_port
from worker.lines import steps
from worker.lines.records import LineRecord, LineStatus, Transition
from worker.observability.metrics import ProcessMetrics
from worker.redis import keys
from worker.runtime import Runtime
from worker.services import webhook

KEY = "afk_simulator"
"""The built-in simulator entry's API key: what APIFrame signs its webhooks with."""
JOB = "3c50ad78-df8b-4f7d-8d9f-23fa954f1566"
URL = "https://cdn.apiframe.example/3c50ad78-1.png"


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(latency_s=0.5, sync_latency_s=0.0)) as server:
        yield server


@pytest.fixture(scope="module")
def port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def _runtime(redis_url: str, sim: Simulator, port: int) -> Iterator[Runtime]:
    built = runtime(
        redis_url, simulator_base_url=sim.base_url, webhook_url=f"http://127.0.0.1:{port}/"
    )
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def rt(redis_client: redis.Redis[bytes], _runtime: Runtime) -> Runtime:
    seed_batch(_runtime.state, total=10)
    return _runtime


@pytest.fixture
def receiver(rt: Runtime) -> webhook.Receiver:
    return webhook.Receiver(rt)


def waiting_for(rt: Runtime, job_id: str = JOB, idx: int = 0) -> LineRecord:
    """A line whose job was accepted and indexed for webhooks, as the runner leaves it."""
    rec = record(idx, status=LineStatus.SUBMITTING, seq=2)
    put_line(rt.state, rec)
    accepted = Transition(LineStatus.SUBMITTED, {"job_id": job_id, "accepted_at": time.time()})
    assert rt.state.apply(rec, accepted, model="gpt-image-1.5", index_jobs=True).applied
    now = rt.state.read(BATCH, idx)
    assert now is not None
    return now


def delivery(event: str = "completed", job_id: str = JOB, **fields: Any) -> bytes:
    body: dict[str, Any] = {"event": event, "jobId": job_id}
    if event == "completed":
        body |= {
            "status": "COMPLETED",
            "result": {"images": [URL]},
            "creditCost": 24,
            "createdAt": "2026-05-02T09:00:00.000Z",
            "completedAt": "2026-05-02T09:00:12.500Z",
        }
    return json.dumps(body | fields).encode()


def signed(body: bytes, key: str = KEY) -> str:
    return "sha256=" + webhook.signature(body, key)


def handle(receiver: webhook.Receiver, body: bytes, header: str | None = "") -> tuple[int, str]:
    return receiver.handle(body, signed(body) if header == "" else header)


def test_the_callback_url_is_the_public_base_url_and_the_webhook_path(
    rt: Runtime, port: int
) -> None:
    assert rt.settings.webhook_callback_url() == f"http://127.0.0.1:{port}/webhooks/apiframe"
    assert settings(rt.settings.redis_url or "").webhook_callback_url() is None


def test_a_signed_completed_webhook_fetches_the_line_it_names(
    rt: Runtime, receiver: webhook.Receiver
) -> None:
    waiting_for(rt)

    assert handle(receiver, delivery()) == (200, "applied")

    rec = rt.state.read(BATCH, 0)
    assert rec is not None and rec.status is LineStatus.FETCHED
    assert rec.artifacts == ({"url": URL},) and rec.credits == 24.0
    assert rt.state.in_flight(PROVIDER) == 0
    assert rt.state.line_of_job(PROVIDER, JOB) is None  # no second delivery can find it
    assert rt.state.counters(BATCH)["webhooks"] == 1.0
    assert rt.state.expected_latency(PROVIDER, "gpt-image-1.5") == pytest.approx(12.5)


def test_a_line_a_webhook_finishes_is_logged_and_counted_like_one_a_poll_finishes(
    rt: Runtime, receiver: webhook.Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    # Given this process's metrics watching its transitions (as a worker's and run's do)
    registry = CollectorRegistry()
    rt.observers.append(ProcessMetrics(registry).observe)
    waiting_for(rt)
    # When a signed webhook says the line's job completed
    with caplog.at_level(logging.INFO, logger="imagebatch.lines"):
        assert handle(receiver, delivery()) == (200, "applied")
    # Then the line's transition is in the log with its context, and in the metrics
    logged = [r for r in caplog.records if getattr(r, "line_id", None) == "line-0"]
    assert [r.getMessage() for r in logged] == ["line line-0: completed"]
    assert logged[0].__dict__["job_id"] == JOB and logged[0].__dict__["batch"] == BATCH
    labels = {"provider": PROVIDER, "step": "poll", "outcome": "completed"}
    assert registry.get_sample_value("imagebatch_transitions_total", labels) == 1.0
    assert (
        registry.get_sample_value(
            "imagebatch_credits_total", {"provider": PROVIDER, "unit": "credits"}
        )
        == 24.0
    )
    assert registry.get_sample_value("imagebatch_job_seconds_count", {"provider": PROVIDER}) == 1.0


@pytest.mark.parametrize(
    "header",
    [None, "sha256=" + "0" * 64, "signed-with-another-key"],
    ids=["missing", "wrong", "other-key"],
)
def test_a_webhook_without_a_valid_signature_is_refused_and_changes_nothing(
    rt: Runtime, receiver: webhook.Receiver, header: str | None
) -> None:
    before = waiting_for(rt)
    body = delivery()
    if header == "signed-with-another-key":
        header = signed(body, key="afk_someone_else")

    assert receiver.handle(body, header) == (401, "bad signature")
    assert rt.state.read(BATCH, 0) == before


def test_a_signature_over_other_bytes_is_refused(rt: Runtime, receiver: webhook.Receiver) -> None:
    waiting_for(rt)

    assert receiver.handle(delivery(), signed(delivery(creditCost=0))) == (401, "bad signature")


def test_a_signed_body_that_is_no_webhook_is_a_bad_request(
    rt: Runtime, receiver: webhook.Receiver
) -> None:
    for body in (b"not json", b"[1, 2]", b'{"event": "completed"}'):
        assert handle(receiver, body) == (400, "not a webhook body")


def test_a_webhook_for_a_job_no_line_waits_for_is_ignored(
    rt: Runtime, receiver: webhook.Receiver
) -> None:
    before = waiting_for(rt)

    assert handle(receiver, delivery(job_id="some-other-job")) == (200, "unknown job: ignored")
    assert rt.state.read(BATCH, 0) == before


def test_a_replayed_webhook_changes_nothing(rt: Runtime, receiver: webhook.Receiver) -> None:
    waiting_for(rt)
    assert handle(receiver, delivery())[0] == 200
    after_first = rt.state.read(BATCH, 0)

    status, _ = handle(receiver, delivery())

    assert status == 200
    assert rt.state.read(BATCH, 0) == after_first


def test_a_webhook_for_a_job_the_line_has_moved_past_is_stale(
    rt: Runtime, receiver: webhook.Receiver
) -> None:
    rec = waiting_for(rt)
    # The line's job failed (by a poll) and the line waits for a new attempt.
    new_job = Transition(LineStatus.READY, {"attempt": 2, "job_id": ""})
    assert rt.state.apply(rec, new_job, model="gpt-image-1.5", index_jobs=False).applied
    rt.state.client.hset(keys.jobs(PROVIDER), JOB, rec.member)  # an index entry left behind

    assert handle(receiver, delivery()) == (200, "stale: ignored")
    after = rt.state.read(BATCH, 0)
    assert after is not None and after.status is LineStatus.READY


def test_a_progress_webhook_changes_nothing(rt: Runtime, receiver: webhook.Receiver) -> None:
    before = waiting_for(rt)

    assert handle(receiver, delivery("progress", progress=40)) == (200, "progress noted")
    assert rt.state.read(BATCH, 0) == before


def test_a_completed_webhook_without_images_is_ignored(
    rt: Runtime, receiver: webhook.Receiver
) -> None:
    before = waiting_for(rt)

    assert handle(receiver, delivery(result=None)) == (200, "no result yet: ignored")
    assert rt.state.read(BATCH, 0) == before


def test_a_failed_webhook_buys_the_line_a_new_attempt(
    rt: Runtime, receiver: webhook.Receiver
) -> None:
    waiting_for(rt)

    assert handle(receiver, delivery("failed", error="Upstream provider timeout"))[0] == 200

    rec = rt.state.read(BATCH, 0)
    assert rec is not None
    assert (rec.status, rec.attempt, rec.job_id) == (LineStatus.READY, 2, "")


def test_a_webhook_failing_the_job_for_content_policy_fails_the_line(
    rt: Runtime, receiver: webhook.Receiver
) -> None:
    waiting_for(rt)
    reason = "Content policy violation: the request was flagged by the safety system"

    assert handle(receiver, delivery("failed", error=reason)) == (200, "applied")

    assert rt.state.read(BATCH, 0) is None
    ((_, row),) = (entry.split("\t", 1) for entry in rt.state.pending_rows(BATCH, 5))
    assert json.loads(row)["error"]["type"] == "content_policy"
    assert rt.state.counters(BATCH)["failed"] == 1.0


# -- over HTTP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def _served(_runtime: Runtime, port: int) -> Iterator[str]:
    server = webhook.serve(_runtime, "127.0.0.1", port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def served(rt: Runtime, _served: str) -> str:
    """The module's receiver (at the runtime's ``webhook_url``), on a freshly seeded Redis."""
    return _served


def test_the_receiver_answers_only_its_path_and_its_health_check(served: str) -> None:
    assert httpx.get(served + "/healthz").status_code == 200
    assert httpx.get(served + "/").status_code == 404
    assert httpx.post(served + "/somewhere", content=b"{}").status_code == 404
    unsigned = httpx.post(served + WEBHOOK_PATH, content=delivery())
    assert (unsigned.status_code, unsigned.json()) == (401, {"status": "bad signature"})


def test_a_refused_request_leaves_the_connection_usable_for_the_next(served: str) -> None:
    with httpx.Client(base_url=served, timeout=5) as client:  # one kept-alive connection
        assert client.post("/somewhere", content=b"{}").status_code == 404

        unsigned = client.post(WEBHOOK_PATH, content=delivery())

    assert unsigned.status_code == 401


def test_the_receiver_refuses_a_body_over_its_cap_unread(served: str) -> None:
    host, _, port = served.removeprefix("http://").partition(":")
    head = (
        f"POST {WEBHOOK_PATH} HTTP/1.1\r\nHost: {host}\r\n"
        f"Content-Length: {webhook.MAX_BODY + 1}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(head.encode())  # and not one byte of the body
        status_line = sock.makefile("rb").readline()

    assert status_line.split()[1] == b"413"


def test_a_signed_delivery_over_http_advances_the_line(rt: Runtime, served: str) -> None:
    waiting_for(rt)
    body = delivery()

    answer = httpx.post(
        served + WEBHOOK_PATH, content=body, headers={"X-Webhook-Signature": signed(body)}
    )

    assert (answer.status_code, answer.json()) == (200, {"status": "applied"})
    rec = rt.state.read(BATCH, 0)
    assert rec is not None and rec.status is LineStatus.FETCHED


def test_the_simulator_s_own_webhook_reaches_the_line_it_names(
    rt: Runtime, served: str, sim: Simulator
) -> None:
    ctx = rt.context(rt.state.batch(BATCH))
    rec = record(status=LineStatus.SUBMITTING, seq=2)
    put_line(rt.state, rec)
    t = steps.submit(ctx, rec)  # asks the simulator for a webhook to ctx.webhook_url
    assert t.status is LineStatus.SUBMITTED
    assert rt.state.apply(rec, t, model="gpt-image-1.5", index_jobs=True).applied

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        now = rt.state.read(BATCH, 0)
        if now is not None and now.status is LineStatus.FETCHED:
            break
        time.sleep(0.05)

    assert now is not None and now.status is LineStatus.FETCHED
    assert now.artifacts == ({"url": f"{sim.base_url}/cdn/images/{t.changes['job_id']}-1.png"},)
    assert sim.ledger()["webhooks"]["delivered"] >= 1
