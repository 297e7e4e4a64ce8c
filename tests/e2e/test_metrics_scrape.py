"""A real Prometheus scrape during and after a run agrees with the batch's summary."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import redis
from pydantic import SecretStr

from jobs.manifest.spool import spool
from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import check_invariants, read_local, wait_for
from tests.servers import free_port
from tests.unit.observability.test_metrics import (
    KEY,
    Scrape,
    make_settings,
    port_open,
    scrape,
    total,
    write_manifest,
)
from worker.observability import metrics
from worker.redis.keys import QUEUE
from worker.runtime import Runtime


def test_a_real_scrape_during_and_after_a_run_matches_the_summary(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    from worker import runtime
    from worker.batch import start, status
    from worker.celery import app as celery_app
    from worker.celery.embedded import in_process_worker

    lines, batch = 16, "metered"
    manifest = write_manifest(tmp_path / "manifest.jsonl", lines)
    port = free_port()
    # Given a simulator that runs 2 jobs at once while imagebatch may send 6 (so some 429s)
    config = SimulatorConfig(latency_s=0.6, latency_jitter_s=0.3, max_in_flight=2)
    with Simulator(config) as sim:
        settings = make_settings(
            broker_url=redis_url,
            apiframe_base_url=sim.base_url,
            apiframe_api_key=SecretStr(KEY),
            apiframe_max_in_flight=6,
            out=str(tmp_path / "out"),
            poll_initial_s=0.2,
            poll_max_s=0.4,
            retry_base_s=0.05,
            retry_max_s=0.5,
            visibility_timeout_s=10,
            lease_s=5,
            metrics_host="127.0.0.1",
            metrics_port=port,
        )
        rt = runtime.configure(settings)
        app = celery_app.configure(settings, redis_url)
        during: list[Scrape] = []
        try:
            with in_process_worker(app, 8), metrics.serving(rt) as endpoint:
                assert endpoint is not None
                spooled = spool([manifest.read_bytes()])
                try:
                    started = start.start_batch(
                        rt, spooled, batch=batch, out=str(tmp_path / "out"), provider="apiframe"
                    )
                finally:
                    Path(spooled.path).unlink(missing_ok=True)
                assert started.plan.valid == lines

                # When /metrics is scraped over HTTP while the batch runs...
                def finished() -> bool:
                    during.append(scrape(endpoint.url))
                    snap = status.from_redis(rt.state, batch)
                    return snap is not None and snap.finished

                wait_for(finished, 90, "the batch to finish", interval=0.1)
                # ...and once more after it finished
                after = scrape(endpoint.url)
                ledger = sim.ledger()
            assert not port_open(port)  # the endpoint was stopped with its block
        finally:
            runtime.reset()

    outcome = read_local(tmp_path / "out", batch)
    check_invariants(manifest, outcome, ledger, redis_client, idempotent=True)
    summary = outcome.summary
    assert summary["failed"] == 1 and summary["rejected"] == 1, summary
    assert summary["throttled"] > 0, "the simulator's limit should have answered 429"

    # Then while it ran, some scrape saw lines in flight, and the batch's fleet-wide counts
    in_flight = [total(s, "imagebatch_in_flight", provider="apiframe") for s in during]
    assert max(in_flight) > 0, in_flight
    assert {total(s, "imagebatch_batch_lines", batch=batch) for s in during} >= {lines + 1}
    rejected = [
        total(s, "imagebatch_batch_lines_ended", batch=batch, status="rejected") for s in during
    ]
    assert max(rejected) == 1
    assert all(total(s, "imagebatch_redis_up") == 1 for s in during)
    assert max(total(s, "imagebatch_limit_cap", provider="apiframe") for s in during) <= 6

    # ...and after, this process's counts equal the batch's summary.json
    provider = {"provider": "apiframe"}
    assert total(after, "imagebatch_lines_total", status="succeeded") == summary["succeeded"]
    assert total(after, "imagebatch_lines_total", status="failed") == summary["failed"] == 1
    failures = total(after, "imagebatch_line_failures_total", **provider, type="content_policy")
    assert failures == 1 == summary["failures"].get("content_policy"), summary["failures"]
    images = sum(part["images"] for part in summary["by_provider"].values())
    assert total(after, "imagebatch_images_stored_total", **provider) == images == lines - 1
    credits = total(after, "imagebatch_credits_total", **provider, unit="credits")
    assert credits == summary["credits"] > 0 and summary["credit_unit"] == "credits"
    assert total(after, "imagebatch_throttled_total", **provider) == summary["throttled"]
    assert total(after, "imagebatch_throttled_total", **provider, kind="concurrency") > 0
    assert total(after, "imagebatch_polls_total", **provider) == summary["polls"]
    accepted = total(after, "imagebatch_transitions_total", **provider, outcome="accepted")
    assert accepted == summary["jobs_accepted"]
    jobs_done = total(after, "imagebatch_job_seconds_count", **provider)
    assert jobs_done == lines - 1  # every job but the refused one finished
    if "seconds" in inspect.signature(Runtime.observe).parameters:
        # the runner times its steps (see the report): every transition has a duration
        timed = total(after, "imagebatch_step_seconds_count", **provider)
        assert timed == total(after, "imagebatch_transitions_total", **provider)
    # ...the finished batch is no longer reported, and its provider's slots are all back
    assert total(after, "imagebatch_batch_lines", batch=batch) == 0
    assert total(after, "imagebatch_in_flight", **provider) == 0
    assert [s.labels for s in after["imagebatch_queue_depth"]] == [{"queue": QUEUE}]
