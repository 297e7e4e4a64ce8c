"""Prometheus metrics (``worker.observability.metrics``): the observer and the fleet collector
on their own, then a real endpoint scraped over HTTP while a real batch runs, and after,
against its summary.json."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from jobs.errors import ConfigError, ImagebatchError
from jobs.manifest.request import ImageRequest
from jobs.settings import Settings
from tests.servers import free_port
from worker.lines.endings import make_row
from worker.lines.records import LimitEvent, LineRecord, LineStatus, Step, Transition
from worker.observability import fleet, metrics
from worker.redis import keys
from worker.redis.keys import QUEUE
from worker.redis.state import State
from worker.runtime import Runtime

KEY = "afk_metrics_test_key_0123456789abcdef"

# --- helpers ---------------------------------------------------------------------------------

Scrape = dict[str, list[Sample]]


def scrape(url: str) -> Scrape:
    """GET /metrics and parse it: sample name -> samples."""
    response = httpx.get(url, timeout=5)
    assert response.status_code == 200, response.text
    samples: Scrape = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def total(samples: Scrape, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(
        s.value
        for s in samples.get(name, [])
        if all(s.labels.get(k) == v for k, v in labels.items())
    )


def make_settings(**fields: Any) -> Settings:
    """``Settings`` with per-provider fields (generated from the registry, unknown to mypy)."""
    return Settings(**fields)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def record(provider: str = "apiframe", **fields: Any) -> LineRecord:
    request = ImageRequest(prompt="a mug", size="1024x1024", output_format="png")
    return LineRecord(
        batch="b", idx=0, line=1, id="sku-1", provider=provider,
        request_json=request.model_dump_json(), **fields,
    )  # fmt: skip


IMAGE = {
    "uri": "/out/b/images/sku-1/0.png",
    "sha256": "0" * 64,
    "bytes": 10,
    "content_type": "image/png",
    "width": 1024,
    "height": 1024,
}

# --- the observer ----------------------------------------------------------------------------


def test_observer_counts_a_line_from_submit_to_stored_and_a_failure() -> None:
    registry = CollectorRegistry()
    m = metrics.ProcessMetrics(registry)
    ready = record()
    # Given a line that is throttled once, accepted, polled twice, fetched and stored
    throttled = Transition(
        LineStatus.READY,
        counts={"throttled": 1},
        limit=LimitEvent("concurrency", Step.SUBMIT, 1.0),
        outcome="429 (concurrency)",
    )
    m.observe(ready, throttled, 0.02)
    accepted = Transition(LineStatus.SUBMITTED, {"job_id": "j1"}, outcome="accepted")
    m.observe(ready, accepted, 0.04)
    submitted = ready.evolve(status=LineStatus.SUBMITTED, job_id="j1")
    pending = Transition(LineStatus.SUBMITTED, {"polls": 1}, counts={"polls": 1}, outcome="pending")
    m.observe(submitted, pending, 0.01)
    fetched = Transition(
        LineStatus.FETCHED,
        {"credits": 24.0, "artifacts": ({"url": "u"},)},
        counts={"polls": 1},
        latency_s=3.5,
        outcome="completed",
    )
    m.observe(submitted, fetched, 0.01)
    stored_rec = submitted.evolve(status=LineStatus.FETCHED, credits=24.0)
    done = stored_rec.evolve(images=(IMAGE,))
    m.observe(
        stored_rec,
        Transition(LineStatus.SUCCEEDED, row=make_row(done, "succeeded"), outcome="succeeded"),
        0.3,
    )
    # ...and another whose job is refused by content policy, seen without a duration
    policy = ImagebatchError("refused", type="content_policy")
    failed_row = make_row(submitted, "failed", policy)
    m.observe(
        submitted, Transition(LineStatus.FAILED, row=failed_row, outcome="failed (content_policy)")
    )

    # Then every count is exact, and labelled only by provider, step, outcome, type, kind
    provider = {"provider": "apiframe"}
    assert value(registry, "imagebatch_lines_total", **provider, status="succeeded") == 1
    assert value(registry, "imagebatch_lines_total", **provider, status="failed") == 1
    assert value(registry, "imagebatch_line_failures_total", **provider, type="content_policy") == 1
    assert value(registry, "imagebatch_images_stored_total", **provider) == 1
    assert value(registry, "imagebatch_credits_total", **provider, unit="credits") == 24
    assert value(registry, "imagebatch_throttled_total", **provider, kind="concurrency") == 1
    assert value(registry, "imagebatch_polls_total", **provider) == 2
    step = "imagebatch_transitions_total"
    assert value(registry, step, **provider, step="submit", outcome="429") == 1
    assert value(registry, step, **provider, step="submit", outcome="accepted") == 1
    assert value(registry, step, **provider, step="poll", outcome="pending") == 1
    assert value(registry, step, **provider, step="poll", outcome="completed") == 1
    assert value(registry, step, **provider, step="poll", outcome="failed") == 1
    assert value(registry, step, **provider, step="store", outcome="succeeded") == 1
    seconds = "imagebatch_step_seconds"
    assert value(registry, f"{seconds}_count", **provider, step="submit") == 2
    assert value(registry, f"{seconds}_count", **provider, step="poll") == 2  # failure: untimed
    assert value(registry, f"{seconds}_bucket", **provider, step="store", le="0.25") == 0
    assert value(registry, f"{seconds}_bucket", **provider, step="store", le="0.5") == 1
    assert value(registry, "imagebatch_job_seconds_count", **provider) == 1
    assert value(registry, "imagebatch_job_seconds_sum", **provider) == 3.5
    # ...and no label anywhere carries the line's id, its prompt or its batch
    values = {v for fam in registry.collect() for s in fam.samples for v in s.labels.values()}
    assert not values & {"sku-1", "b", "a mug", "j1"}, values


def test_observer_is_thread_safe_and_a_line_bought_in_parts_counts_each_image_once() -> None:
    registry = CollectorRegistry()
    m = metrics.ProcessMetrics(registry)
    # Given a line bought in two parts: the first part stores 2 images, the second 1 more
    fetched = record(status=LineStatus.FETCHED)
    part = Transition(LineStatus.READY, {"images": (IMAGE, IMAGE)}, outcome="next part")
    rest = fetched.evolve(images=(IMAGE, IMAGE))
    last = Transition(
        LineStatus.SUCCEEDED,
        row=make_row(rest.evolve(images=(IMAGE, IMAGE, IMAGE)), "succeeded"),
        outcome="succeeded",
    )

    # When 8 threads each count 250 such lines at once
    def work() -> None:
        for _ in range(250):
            m.observe(fetched, part, 0.001)
            m.observe(rest, last, 0.001)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Then nothing was lost to a race, and each image was counted once
    assert (
        value(registry, "imagebatch_lines_total", provider="apiframe", status="succeeded") == 2000
    )
    assert value(registry, "imagebatch_images_stored_total", provider="apiframe") == 3 * 2000
    count = value(registry, "imagebatch_step_seconds_count", provider="apiframe", step="store")
    assert count == 4000


def test_a_surprising_label_value_is_made_safe() -> None:
    assert fleet.label("Failed (Weird Type!)") == "failed_weird_type"
    assert fleet.label("x" * 100) == "x" * 40
    assert fleet.label("") == "none"
    t = Transition(LineStatus.FETCHED, outcome="image not there yet")
    assert metrics.outcome_label(t) == "image_not_there_yet"


# --- the fleet collector, on a real Redis ----------------------------------------------------


def command_calls(client: redis.Redis[Any]) -> int:
    """Commands Redis has run, but for the INFO that asks."""
    stats = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def test_collector_reports_the_fleet_from_redis_in_a_few_commands(
    redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    settings = make_settings(
        broker_url=redis_url, apiframe_max_in_flight=8, apiframe_requests_per_second=5.0
    )
    state = State(redis.Redis.from_url(redis_url, decode_responses=True))
    now = time.time()
    # Given a running batch, lines in flight and waiting, a throttled provider and a queue
    state.seed(
        "b1",
        {"batch_id": "b1", "total": 10, "status": "running"},
        {"done": 4, "succeeded": 2, "failed": 1, "rejected": 1, "credits:apiframe credits": 48.0},
        b"",
        {},
    )
    state.client.zadd(keys.flight("apiframe"), {keys.member("b1", i): now for i in range(3)})
    state.client.zadd(
        keys.ready("b1", "apiframe"), {keys.member("b1", i): now for i in range(3, 5)}
    )
    state.client.sadd(keys.PROVIDERS, "apiframe", "openai")
    state.set_limits(
        "apiframe", cap=3, submit_rate=2.5, poll_rate=4.0, submit_pause=now + 30, throttled=7
    )
    state.client.rpush(QUEUE, "m1", "m2", "m3")
    # ...an account that left the batch's pool, and one cooling down after failing
    state.leave_pool("b1", "openai", "openai answered 402")
    state.client.hset(keys.health("openai"), mapping={"until": now + 20, "probe": 0})
    m = metrics.Metrics(settings)
    try:
        # When it is scraped
        registry = m.registry
        assert value(registry, "imagebatch_redis_up") == 1
        # Then it reports the fleet's truth
        assert value(registry, "imagebatch_batch_lines", batch="b1") == 10
        assert value(registry, "imagebatch_batch_lines_done", batch="b1") == 4
        ended = "imagebatch_batch_lines_ended"
        assert value(registry, ended, batch="b1", status="succeeded") == 2
        assert value(registry, ended, batch="b1", status="failed") == 1
        assert value(registry, ended, batch="b1", status="rejected") == 1
        credits = value(
            registry, "imagebatch_batch_credits", batch="b1", currency="apiframe credits"
        )
        assert credits == 48
        assert value(registry, "imagebatch_batch_status", batch="b1", status="running") == 1
        assert value(registry, "imagebatch_in_flight", provider="apiframe") == 3
        assert value(registry, "imagebatch_waiting", provider="apiframe") == 2
        assert value(registry, "imagebatch_limit_cap", provider="apiframe") == 3
        rates = {
            kind: value(registry, "imagebatch_limit_rate", provider="apiframe", kind=kind)
            for kind in ("submit", "poll")
        }
        assert rates == {"submit": 2.5, "poll": 4.0}
        pause = value(
            registry, "imagebatch_limit_pause_seconds", provider="apiframe", kind="submit"
        )
        assert pause is not None and 25 < pause <= 30
        assert (
            value(registry, "imagebatch_limit_pause_seconds", provider="apiframe", kind="poll") == 0
        )
        assert value(registry, "imagebatch_throttled", provider="apiframe") == 7
        # ...a provider never throttled is at its configured ceiling
        openai = settings.provider_config("openai")
        assert value(registry, "imagebatch_in_flight", provider="openai") == 0
        assert value(registry, "imagebatch_limit_cap", provider="openai") == openai.max_in_flight
        rate = value(registry, "imagebatch_limit_rate", provider="openai", kind="submit")
        assert rate == openai.submit_rate
        assert value(registry, "imagebatch_queue_depth", queue=QUEUE) == 3
        out = value(registry, "imagebatch_batch_provider_out", batch="b1", provider="openai")
        assert out == 1
        state_of = "imagebatch_provider_state"
        assert value(registry, state_of, provider="openai", state="cooling") == 1
        assert value(registry, state_of, provider="apiframe", state="healthy") == 1
        cooldown = value(registry, "imagebatch_provider_cooldown_seconds", provider="openai")
        assert cooldown is not None and 15 < cooldown <= 20

        # ...in a few commands per scrape, however many lines there are
        def commands_per_scrape() -> int:
            before = command_calls(redis_client)
            list(registry.collect())
            return command_calls(redis_client) - before

        few = commands_per_scrape()
        assert few == 3 + 3 * 1 + 4 * 2, few
        state.client.zadd(keys.flight("apiframe"), {keys.member("b1", i): now for i in range(500)})
        assert commands_per_scrape() == few
        assert value(registry, "imagebatch_in_flight", provider="apiframe") == 500
        # ...and a finished batch (no longer active) is no longer reported
        state.deactivate("b1")
        assert value(registry, "imagebatch_batch_lines", batch="b1") is None
    finally:
        m.close()
        state.client.close()


def test_collector_says_redis_is_down_quickly_instead_of_failing_the_scrape() -> None:
    settings = Settings(broker_url=f"redis://127.0.0.1:{free_port()}/0")
    m = metrics.Metrics(settings)
    try:
        started = time.monotonic()
        assert value(m.registry, "imagebatch_redis_up") == 0
        assert value(m.registry, "imagebatch_in_flight", provider="apiframe") is None
        assert time.monotonic() - started < fleet.SCRAPE_TIMEOUT_S + 1
        # the process's own metrics are still there
        assert value(m.registry, "process_cpu_seconds_total") is not None
    finally:
        m.close()


# --- the endpoint ----------------------------------------------------------------------------


@pytest.fixture
def runtime_on(redis_url: str) -> Iterator[Any]:
    """A factory of runtimes on the test Redis; each is closed after the test."""
    made: list[Runtime] = []

    def make(**settings: Any) -> Runtime:
        rt = Runtime(Settings(broker_url=redis_url, **settings))
        made.append(rt)
        return rt

    yield make
    for rt in made:
        rt.close()


def test_serving_does_nothing_without_a_port(runtime_on: Any) -> None:
    rt = runtime_on()
    with metrics.serving(rt) as endpoint:
        assert endpoint is None
        assert rt.observers == []


def test_one_endpoint_per_address_shared_by_run_and_its_worker_then_stopped(
    runtime_on: Any, redis_client: redis.Redis[Any]
) -> None:
    port = free_port()
    rt = runtime_on(metrics_port=port)
    exporter = metrics.Exporter(rt)  # what the worker bootstep starts
    with metrics.serving(rt) as endpoint:
        assert endpoint is not None and endpoint.url == f"http://127.0.0.1:{port}/metrics"
        exporter.start()
        assert exporter.endpoint is endpoint
        assert rt.observers == [endpoint.metrics.process.observe]
        samples = scrape(endpoint.url)
        assert total(samples, "imagebatch_redis_up") == 1
        # a second runtime on the same address joins the endpoint, and feeds it too
        other = runtime_on(metrics_port=port)
        with metrics.serving(other) as joined:
            assert joined is endpoint
            assert other.observers == [endpoint.metrics.process.observe]
        assert other.observers == []
    # the worker still serves after run's block ends...
    assert port_open(port)
    exporter.stop()
    exporter.stop()  # a second stop (terminate after stop) is harmless
    # ...and the last user closes it
    assert not port_open(port)
    assert rt.observers == []


def test_a_taken_port_is_a_config_error_naming_the_setting(runtime_on: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        rt = runtime_on(metrics_port=taken.getsockname()[1])
        with pytest.raises(ConfigError, match="IMAGEBATCH_METRICS_PORT"), metrics.serving(rt):
            pass
    assert rt.observers == []


# --- a real batch, scraped while it runs -----------------------------------------------------


def write_manifest(path: Path, count: int) -> Path:
    lines = []
    for i in range(count):
        prompt = f"Studio photo of product number {i:03d} on a grey seamless background"
        if i == 3:
            prompt += " [[policy]]"  # the simulator refuses it: one line fails
        line = {"id": f"line-{i:03d}", "prompt": prompt, "size": "1024x1024"}
        lines.append(json.dumps({**line, "output_format": "png", "quality": "medium"}))
    lines.append(json.dumps({"id": "bad", "prompt": "x", "size": "1000x1000"}))  # rejected
    path.write_text("\n".join(lines) + "\n")
    return path
