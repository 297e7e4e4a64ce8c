"""``plan``'s time estimate: the scheduler's model, with what the fleet's Redis has learned."""

from __future__ import annotations

import json
import time

import pytest
import redis

from jobs.settings import CoreSettings
from jobs.validate import Plan, tally
from tests.runtime_support import plan_settings, settings, text_client
from worker.batch import estimate as plans
from worker.redis.state import State

LINES = [json.dumps({"id": f"p{n}", "prompt": f"a chair, view {n}"}).encode() for n in range(200)]


def planned(configured: CoreSettings) -> Plan:
    return tally([b"\n".join(LINES) + b"\n"], plans.Adapters(configured), "simulator")


def estimate(configured: CoreSettings, known: plans.Known | None = None) -> float:
    return plans.estimate_seconds(configured, planned(configured), known=known)


@pytest.fixture
def configured(redis_client: redis.Redis[bytes], redis_url: str) -> CoreSettings:
    return plan_settings(redis_url)


def test_a_cold_estimate_is_rounds_of_the_configured_cap_times_the_latency(
    configured: CoreSettings,
) -> None:
    # 200 jobs at 50 in flight: four rounds of 5 s, plus validating and finalizing.
    assert estimate(configured) == pytest.approx(4 * 5.0 + plans.OVERHEAD_S)


def test_learned_account_limits_and_latency_lengthen_the_estimate(
    configured: CoreSettings, redis_url: str
) -> None:
    state = State(text_client(redis_url))
    state.set_limits("simulator", cap=16, submit_rate=10.0, poll_rate=12.0)
    state.client.hset("ib:latency:simulator:gpt-image-1.5", mapping={"mean": 3.0, "dev": 0.0})

    known = plans.learned(configured, ["simulator"])

    learned = plans.Learned(cap=16, submit_rate=10.0, poll_rate=12.0, latency_s=3.0)
    assert known.accounts == {"simulator": learned}
    # 200 jobs at 16 in flight: 13 rounds of 3 s; their 200 submits at 10/s take 20 s; their
    # 600 polls at 12/s (learned: below the 100/s configured) take 50 s: the poll rate rules.
    polls = 200 * plans.POLLS_PER_JOB / 12.0
    assert estimate(configured, known) == pytest.approx(polls + plans.OVERHEAD_S)


def test_a_learned_cap_never_lifts_the_estimate_above_the_configured_ceiling(
    configured: CoreSettings, redis_url: str
) -> None:
    State(text_client(redis_url)).set_limits(
        "simulator", cap=500, submit_rate=400.0, poll_rate=400.0
    )

    known = plans.learned(configured, ["simulator"])

    assert estimate(configured, known) == estimate(configured)


def test_fast_jobs_on_high_limits_are_bound_by_the_workers_alive(
    configured: CoreSettings, redis_url: str
) -> None:
    quick = configured.model_copy(
        update={
            "simulator_expected_latency_s": 0.2,
            "simulator_max_in_flight": 400,
            "simulator_requests_per_second": 1000,
            "simulator_polls_per_second": 1000,
        }
    )
    one = plans.learned(quick, ["simulator"])
    state = State(text_client(redis_url))
    for host, pid in (("a", 1), ("a", 2), ("b", 1), ("c", 7)):  # two share a host
        state.worker_alive(host, pid, ttl=60)

    four = plans.learned(quick, ["simulator"])

    assert (one.workers, four.workers) == (1, 4)
    # 200 jobs of 0.2 s: the provider could take them in a second; one worker needs 5 s.
    assert estimate(quick, one) == pytest.approx(200 / plans.JOBS_PER_WORKER_S + plans.OVERHEAD_S)
    assert estimate(quick, four) == pytest.approx(
        200 / (4 * plans.JOBS_PER_WORKER_S) + plans.OVERHEAD_S
    )


def test_plan_without_any_redis_uses_the_configured_model() -> None:
    alone = settings(None)  # type: ignore[arg-type]

    assert plans.learned(alone, ["simulator"]) == plans.Known()


def test_plan_gives_up_on_a_redis_that_does_not_answer_within_a_second() -> None:
    dead = settings("redis://127.0.0.1:9/0")
    began = time.monotonic()

    assert plans.learned(dead, ["simulator"]) == plans.Known()
    assert time.monotonic() - began < 3
