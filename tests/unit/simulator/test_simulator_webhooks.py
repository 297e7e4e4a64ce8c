"""APIFrame webhooks from the simulator (docs/providers.md, "APIFrame: webhooks"), caught by a
receiver on 127.0.0.1.

Each test checks what a client verifying webhooks depends on: the signature over the raw
body, the headers, the payload, retries after a failed delivery, duplicates and drops.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from jobs.simulator import Simulator, SimulatorConfig

KEY = "afk_webhook_test_key"
JOB_FIELDS = {"event", "jobId", "status", "progress", "result", "model", "creditCost"}


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads(self.body)
        return loaded


@dataclass
class Receiver:
    """Records every POST; ``answers`` are the status codes to give, in order, then 200."""

    url: str
    deliveries: list[Delivery] = field(default_factory=list)
    answers: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.deliveries) >= count:
                    return list(self.deliveries)
            time.sleep(0.01)
        raise AssertionError(f"{len(self.deliveries)} deliveries, expected {count}")

    def events(self) -> list[str]:
        with self.lock:
            return sorted(d.headers["x-webhook-event"] for d in self.deliveries)


def _handler_for(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k.lower(): v for k, v in self.headers.items()}
            with receiver.lock:
                receiver.deliveries.append(Delivery(self.path, headers, body))
                status = receiver.answers.pop(0) if receiver.answers else 200
            self.send_response(status)
            if 300 <= status < 400:
                self.send_header("Location", receiver.url + "/moved")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(made))
    made.url = f"http://127.0.0.1:{server.server_address[1]}/hooks/apiframe"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield made
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    config = SimulatorConfig(latency_s=0.2, webhook_backoff_s=0.05, webhook_timeout_s=1.0)
    with Simulator(config) as simulator:
        yield simulator


@pytest.fixture
def api(sim: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers={"X-API-Key": KEY}, timeout=5) as client:
        yield client


def submit(api: httpx.Client, url: str, prompt: str = "a heron", **fields: Any) -> str:
    body = {"prompt": prompt, "model": "gpt-image-1.5", "webhookUrl": url, **fields}
    response = api.post("/v2/images/generate", json=body)
    assert response.status_code == 202, response.text
    job_id: str = response.json()["jobId"]
    return job_id


def job(api: httpx.Client, job_id: str) -> dict[str, Any]:
    found: dict[str, Any] = api.get(f"/v2/jobs/{job_id}").json()
    return found


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def expected_signature(body: bytes, key: str = KEY) -> str:
    secret = hashlib.sha256(key.encode()).digest()  # the raw digest, as the official SDK
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def test_completed_job_sends_signed_progress_and_completed_events(
    sim: Simulator, api: httpx.Client, receiver: Receiver
) -> None:
    job_id = submit(api, receiver.url, gptImageParams={"number_of_images": 2, "quality": "low"})
    assert job(api, job_id)["webhookStatus"] == "pending"
    deliveries = receiver.wait_for(2)
    eventually(lambda: job(api, job_id)["webhookStatus"] == "delivered")
    polled = job(api, job_id)
    by_event = {d.headers["x-webhook-event"]: d for d in deliveries}
    assert set(by_event) == {"progress", "completed"}
    for event, delivery in by_event.items():
        assert delivery.path == "/hooks/apiframe"
        assert delivery.headers["content-type"] == "application/json"
        assert delivery.headers["x-webhook-signature"] == expected_signature(delivery.body)
        assert delivery.json["event"] == event and delivery.json["jobId"] == job_id
        assert JOB_FIELDS | {"completedAt"} == set(delivery.json)
    progress, completed = by_event["progress"].json, by_event["completed"].json
    assert progress["status"] == "PROCESSING" and 0 < progress["progress"] < 100
    assert progress["result"] is None and progress["completedAt"] is None
    assert completed == {
        "event": "completed",
        "jobId": job_id,
        "status": "COMPLETED",
        "progress": 100,
        "result": polled["result"],
        "model": "gpt-image-1.5",
        "creditCost": 8,
        "completedAt": polled["completedAt"],
    }
    assert len(completed["result"]["images"]) == 2
    ledger = sim.ledger()
    assert ledger["webhooks"] == {"sent": 2, "delivered": 2, "failed": 0, "dropped": 0}
    assert ledger["jobs"][0]["webhook_status"] == "delivered"


def test_a_signature_made_with_another_key_or_body_does_not_match(
    api: httpx.Client, receiver: Receiver
) -> None:
    submit(api, receiver.url, webhookEvents=["completed"])
    (delivery,) = receiver.wait_for(1)
    sent = delivery.headers["x-webhook-signature"]
    assert sent != expected_signature(delivery.body, "afk_another_key")
    assert sent != expected_signature(json.dumps(delivery.json).encode())  # re-serialised
    hex_key = hashlib.sha256(KEY.encode()).hexdigest().encode()
    assert sent != "sha256=" + hmac.new(hex_key, delivery.body, hashlib.sha256).hexdigest()


def test_failed_job_sends_only_the_subscribed_failed_event_with_its_error(
    api: httpx.Client, receiver: Receiver
) -> None:
    job_id = submit(api, receiver.url, "a [[policy]] poster", webhookEvents=["failed"])
    (delivery,) = receiver.wait_for(1)
    body = delivery.json
    assert delivery.headers["x-webhook-event"] == "failed"
    assert body["status"] == "FAILED" and body["creditCost"] == 0 and body["result"] is None
    assert body["error"].startswith("Content policy violation")
    assert body["completedAt"] == job(api, job_id)["completedAt"]
    time.sleep(0.1)
    assert receiver.events() == ["failed"]


def test_string_result_shape_applies_to_webhooks_too(
    sim: Simulator, api: httpx.Client, receiver: Receiver
) -> None:
    sim.update(result_shape="string")
    job_id = submit(api, receiver.url, webhookEvents=["completed"])
    (delivery,) = receiver.wait_for(1)
    assert delivery.json["result"] == job(api, job_id)["result"]
    assert isinstance(delivery.json["result"], str)


def test_a_500_is_retried_with_the_same_bytes_until_delivered(
    sim: Simulator, api: httpx.Client, receiver: Receiver
) -> None:
    receiver.answers = [500, 503]
    job_id = submit(api, receiver.url, webhookEvents=["completed"])
    first, second, third = receiver.wait_for(3)
    assert first.body == second.body == third.body
    assert first.headers["x-webhook-signature"] == third.headers["x-webhook-signature"]
    eventually(lambda: job(api, job_id)["webhookStatus"] == "delivered")
    assert sim.ledger()["webhooks"] == {"sent": 3, "delivered": 1, "failed": 0, "dropped": 0}


def test_delivery_fails_after_the_retries_and_the_job_says_so(
    sim: Simulator, api: httpx.Client, receiver: Receiver
) -> None:
    sim.update(webhook_retries=2)
    receiver.answers = [500] * 10
    job_id = submit(api, receiver.url, webhookEvents=["completed"])
    eventually(lambda: job(api, job_id)["webhookStatus"] == "failed")
    assert len(receiver.deliveries) == 3
    assert sim.ledger()["webhooks"] == {"sent": 3, "delivered": 0, "failed": 1, "dropped": 0}


def test_unreachable_receiver_fails_without_hurting_the_job(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(webhook_retries=1)
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    job_id = submit(api, f"http://127.0.0.1:{port}/hook", webhookEvents=["completed"])
    eventually(lambda: job(api, job_id)["webhookStatus"] == "failed")
    assert job(api, job_id)["status"] == "COMPLETED"
    assert sim.ledger()["webhooks"]["sent"] == 2


def test_redirects_are_not_followed(sim: Simulator, api: httpx.Client, receiver: Receiver) -> None:
    sim.update(webhook_retries=0)
    receiver.answers = [302]
    job_id = submit(api, receiver.url, webhookEvents=["completed"])
    eventually(lambda: job(api, job_id)["webhookStatus"] == "failed")
    assert [d.path for d in receiver.deliveries] == ["/hooks/apiframe"]


def test_duplicate_fault_delivers_every_event_twice(
    sim: Simulator, api: httpx.Client, receiver: Receiver
) -> None:
    sim.update(faults={"webhook_duplicate": 1})
    job_id = submit(api, receiver.url)
    deliveries = receiver.wait_for(4)
    eventually(lambda: job(api, job_id)["webhookStatus"] == "delivered")
    assert receiver.events() == ["completed", "completed", "progress", "progress"]
    for event in ("progress", "completed"):
        a, b = (d.body for d in deliveries if d.headers["x-webhook-event"] == event)
        assert a == b
    assert sim.ledger()["webhooks"] == {"sent": 4, "delivered": 4, "failed": 0, "dropped": 0}


def test_drop_fault_sends_nothing_and_polling_still_tells_the_outcome(
    sim: Simulator, api: httpx.Client, receiver: Receiver
) -> None:
    sim.update(faults={"webhook_drop": 1})
    job_id = submit(api, receiver.url)
    eventually(lambda: sim.ledger()["webhooks"]["dropped"] == 2)
    polled = job(api, job_id)
    assert polled["status"] == "COMPLETED" and polled["webhookStatus"] == "pending"
    assert receiver.deliveries == []
    assert sim.ledger()["webhooks"] == {"sent": 0, "delivered": 0, "failed": 0, "dropped": 2}


def test_no_webhook_url_means_no_webhook_status(api: httpx.Client) -> None:
    response = api.post("/v2/images/generate", json={"prompt": "x", "model": "gpt-image-1.5"})
    assert job(api, response.json()["jobId"])["webhookStatus"] is None


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/hook", "data:text/plain,hi", "http://", "/relative/hook"]
)
def test_only_http_urls_are_accepted(sim: Simulator, api: httpx.Client, url: str) -> None:
    body = {"prompt": "x", "model": "gpt-image-1.5", "webhookUrl": url}
    response = api.post("/v2/images/generate", json=body)
    assert response.status_code == 400 and "webhookUrl" in response.json()["error"]
    assert sim.ledger()["submits"] == 0


def test_reset_cancels_pending_deliveries_and_stop_ends_the_threads(receiver: Receiver) -> None:
    with Simulator(SimulatorConfig(latency_s=0.3)) as simulator:
        with httpx.Client(base_url=simulator.base_url, headers={"X-API-Key": KEY}) as client:
            submit(client, receiver.url)
        simulator.reset()
        time.sleep(0.45)
        assert receiver.deliveries == []
        assert simulator.ledger()["webhooks"]["sent"] == 0
        assert any(t.name.startswith("simulator-webhooks") for t in threading.enumerate())
    assert not any(t.name.startswith("simulator-webhooks") for t in threading.enumerate())
