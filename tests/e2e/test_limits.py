"""A provider whose real limits are below imagebatch's configured ones: a 429 is back-pressure
(the limiter learns the account's limits, shared by every worker), never a failed line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import check_invariants, read_local, run_cli, start_worker, stop, wait_for
from worker.redis import keys

KEY = "afk_limits_test_key_0123456789"


def manifest(path: Path, count: int) -> Path:
    lines = [
        {"id": f"vase-{i:03d}", "prompt": f"A glazed vase, variant {i}", "quality": "low"}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def throttled(ledger: dict[str, Any]) -> int:
    return sum(int(n) for n in ledger["rate_limited"].values())


def api_requests(ledger: dict[str, Any]) -> int:
    return sum(n for label, n in ledger["requests"].items() if "/v2/" in label)


def test_an_account_with_lower_limits_than_ours_throttles_us_but_fails_no_line(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    # Given an account that allows 6 jobs at once and 8 requests a second, while imagebatch
    # is configured for its defaults (64 jobs, 20 requests a second), on two workers
    lines = 160
    source = manifest(tmp_path / "vases.jsonl", lines)
    out = tmp_path / "out"
    account = SimulatorConfig(
        latency_s=0.6, max_in_flight=6, rate_limit_rps=8, rate_limit_burst=8, image_mode="tiny"
    )
    with Simulator(account) as sim:
        env = {
            "IMAGEBATCH_BROKER_URL": redis_url,
            "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
            "IMAGEBATCH_APIFRAME_API_KEY": KEY,
            "IMAGEBATCH_OUT": str(out),
        }
        submitted = run_cli(
            "submit", str(source), "--provider", "apiframe", "--batch-id", "vases", env=env
        )
        assert submitted.returncode == 0, submitted.stderr
        workers = [start_worker(env, f"lim{i}", tmp_path / f"w{i}.log") for i in range(2)]
        try:
            # When it runs until the limiter has had time to learn...
            def done() -> int:
                return int(float(redis_client.hget(keys.counters("vases"), "done") or 0))

            wait_for(lambda: done() >= lines // 2, 120, "half of the lines")
            learned = redis_client.hgetall(keys.limit("apiframe"))
            halfway = sim.ledger()
            # ...and then to the end
            wait_for(lambda: redis_client.hget(keys.batch("vases"), "summary"), 120, "the batch")
        finally:
            for worker in workers:
                stop(worker)
        ledger = sim.ledger()

    # Then every line succeeded: no line failed for a rate limit
    outcome = read_local(out, "vases")
    check_invariants(source, outcome, ledger, redis_client, idempotent=True)
    assert [row.status for row in outcome.rows] == ["succeeded"] * lines
    assert outcome.summary["failures"] == {}
    # ...the 429s it provoked were counted (by imagebatch as by the provider)...
    assert throttled(ledger) > 0, "the account's limits were never reached"
    assert outcome.summary["throttled"] == throttled(ledger)
    # ...the limiter learned limits below ours, shared through Redis (the cap is what *we*
    # had in flight at a concurrency 429: at least the account's 6, more while finished jobs
    # wait for their poll under the request budget)...
    assert 6 <= int(float(learned[b"cap"])) < 64, learned
    assert float(learned[b"rate"]) < 20, learned
    # ...and once it had, 429s were rare: at most 2 % of the second half's requests
    later = throttled(ledger) - throttled(halfway)
    sent = api_requests(ledger) - api_requests(halfway)
    assert later <= max(1, 0.02 * sent), (later, sent)
    assert ledger["submits"] == lines
