"""``worker.lines.steps``: submit, poll and store, each a function from a line's record to one
``Transition``, run against the built-in simulator over real HTTP.

The context is the production one (``Runtime.context`` on the test Redis, a ``LocalStore`` in
``tmp_path``); faults and prompt markers of ``jobs.simulator`` make the provider misbehave.
A step only decides: these tests look at the transition, what the provider's ledger shows
was bought, and what reached the store and Redis.
"""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from PIL import Image

from jobs import policy
from jobs.errors import JobFailed
from jobs.output import previews
from jobs.providers.base import Artifact, Finished
from jobs.simulator import Simulator, SimulatorConfig
from tests.runtime_support import BATCH, put_line, record, runtime
from worker.lines import steps, store
from worker.lines.records import LimitEvent, LineRecord, LineStatus, Step, Transition
from worker.lines.steps import Context
from worker.redis import keys
from worker.runtime import Runtime

HTTP_RETRIES = 2
SIMULATOR_PRICE = 24.0
"""What one gpt-image-1.5 image costs at APIFrame (quality auto): 24 credits."""
PNG = b"\x89PNG\r\n\x1a\n"
SIM_KEY = "afk_simulator"


@pytest.fixture
def no_waits() -> Iterator[None]:
    policy.set_testing(True)
    yield
    policy.set_testing(False)


SIM_CONFIG = SimulatorConfig(latency_s=0.0, sync_latency_s=0.0)
"""Jobs finish the moment they are accepted, synchronous calls answer at once."""


@pytest.fixture(scope="module")
def _simulator() -> Iterator[Simulator]:
    with Simulator(SIM_CONFIG) as simulator:
        yield simulator


@pytest.fixture
def sim(_simulator: Simulator) -> Iterator[Simulator]:
    """The module's simulator, forgetting every job and setting a test changed afterwards."""
    yield _simulator
    _simulator.reset()
    settings = {k: v for k, v in SIM_CONFIG.to_dict().items() if k not in ("host", "port")}
    _simulator.update(**settings)


def make_runtime(redis_url: str, sim: Simulator, **values: Any) -> Runtime:
    defaults: dict[str, Any] = {
        "simulator_base_url": sim.base_url,
        "apiframe_base_url": sim.base_url,
        "apiframe_api_key": "afk_inactive_key",  # a key APIFrame refuses (403)
        "openai_base_url": sim.url_for("openai"),
        "openai_api_key": "sk-test-key",
        "aimlapi_base_url": sim.url_for("aimlapi"),
        "aimlapi_api_key": "sk-test-key",
        "http_retries": HTTP_RETRIES,
        "download_retries": 1,
    }
    return runtime(redis_url, **(defaults | values))


@pytest.fixture(scope="module")
def _runtime(redis_url: str, _simulator: Simulator) -> Iterator[Runtime]:
    built = make_runtime(redis_url, _simulator)
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def rt(redis_client: redis.Redis[bytes], _runtime: Runtime, sim: Simulator) -> Runtime:
    """The module's runtime on an empty Redis (``redis_client`` flushed it)."""
    return _runtime


@pytest.fixture
def out(tmp_path: Path) -> Path:
    return tmp_path / "out"


def context(rt: Runtime, out: Path, **batch: str) -> Context:
    return rt.context({"batch_id": BATCH, "out": str(out), "status": "running", **batch})


def advance(rec: LineRecord, t: Transition) -> LineRecord:
    """The record after ``t``, as apply.lua leaves it (and the next dispatch's seq)."""
    assert t.row is None, t.row
    return rec.evolve(status=t.status, settled=rec.seq, owner="", **t.changes)


def submitting(provider: str = "simulator", **request: Any) -> LineRecord:
    """A line the scheduler just handed out for its submit (``pump.lua`` set SUBMITTING)."""
    return record(provider=provider, status=LineStatus.SUBMITTING, seq=2, request=request)


def never_finishing(sim: Simulator) -> LineRecord:
    """A line whose job runs for ever (a simulated job needs a duration to be in progress)."""
    sim.update(latency_s=1.0)
    return submitting(prompt="a slow one [[never-finish]]")


def accepted(ctx: Context, rec: LineRecord) -> LineRecord:
    t = steps.submit(ctx, rec)
    assert t.status in (LineStatus.SUBMITTED, LineStatus.FETCHED), t
    return advance(rec, t)


def fetched(ctx: Context, **request: Any) -> LineRecord:
    """A line whose APIFrame job finished: its images wait on the simulator's CDN."""
    rec = accepted(ctx, submitting(**request))
    t = steps.poll(ctx, rec)
    assert t.status is LineStatus.FETCHED, t
    return advance(rec, t)


def submits(sim: Simulator) -> int:
    return int(sim.ledger()["submits"])


def requests(sim: Simulator) -> int:
    return sum(sim.ledger()["requests"].values())


# -- submit ---------------------------------------------------------------------------------------


def test_an_accepted_submit_is_submitted_with_its_first_poll_planned(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = submitting()
    before = time.time()

    t = steps.submit(ctx, rec)

    assert t.status is LineStatus.SUBMITTED and t.outcome == "accepted"
    assert t.due_in == rt.settings.poll_initial_s  # nothing learned yet: the cold first poll
    assert t.changes["job_id"] == sim.ledger()["jobs"][0]["id"]
    assert t.changes["deadline"] == pytest.approx(before + rt.settings.line_deadline_s, abs=5)
    assert t.changes["submitted_at"] and t.changes["accepted_at"] >= before
    assert t.counts == {"submit_requests": 1, "jobs_accepted": 1}
    assert t.limit is None and t.stop is None
    key = sim.ledger()["jobs"][0]["idempotency_key"]
    assert key == steps.idempotency_key(BATCH, rec.id, rec.attempt)


def test_a_learned_latency_plans_the_first_poll_while_the_job_still_runs(
    redis_client: redis.Redis[bytes], redis_url: str, sim: Simulator, out: Path
) -> None:
    # A runtime of its own: a process reads the learned latency again only every few seconds.
    fresh = make_runtime(redis_url, sim)
    try:
        earlier = record(9, status=LineStatus.SUBMITTED, seq=2, job_id="j")
        put_line(fresh.state, earlier)
        learned = Transition(LineStatus.FETCHED, latency_s=10.0)
        fresh.state.apply(earlier, learned, model="gpt-image-1.5", index_jobs=False)

        t = steps.submit(context(fresh, out), submitting())
    finally:
        fresh.close()

    assert t.changes["expected_s"] == pytest.approx(10.0)
    # Well before it ends: its progress then tells when it will end
    assert t.due_in == pytest.approx(policy.FIRST_LOOK * 10.0)


def test_a_repeated_submit_of_the_same_attempt_returns_the_job_already_bought(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = submitting()

    first, second = steps.submit(ctx, rec), steps.submit(ctx, rec)

    assert first.changes["job_id"] == second.changes["job_id"]
    assert submits(sim) == 1 and sim.ledger()["replays"] == 1


def test_a_sync_provider_answers_with_images_kept_in_redis_blobs(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    rec = submitting("openai", n=2)

    t = steps.submit(context(rt, out), rec)

    assert t.status is LineStatus.FETCHED
    assert t.changes["artifacts"] == (
        {"blob": keys.blob(BATCH, rec.idx, 0)},
        {"blob": keys.blob(BATCH, rec.idx, 1)},
    )
    for spec in t.changes["artifacts"]:
        data = rt.state.get_blob(spec["blob"])
        assert data is not None and data.startswith(PNG)
    assert t.changes["credits"] == pytest.approx(2 * 0.133)  # OpenAI reports no cost: the price
    assert t.latency_s is None  # a synchronous call teaches nothing about job latency
    assert t.counts == {"submit_requests": 1, "jobs_accepted": 1}


def test_a_429_on_submit_puts_the_line_back_without_costing_a_try(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    sim.update(faults={"error_429": 1.0})
    rec = submitting().evolve(tries=1)

    t = steps.submit(context(rt, out), rec)

    assert t.status is LineStatus.READY
    assert "tries" not in t.changes  # the one try already counted stays the only one
    assert t.limit == LimitEvent("rate", Step.SUBMIT, 1.0)
    assert t.due_in == 1.0  # the provider's Retry-After
    assert t.counts == {"submit_requests": 1, "throttled": 1}
    assert submits(sim) == 0


def test_a_429_for_too_many_jobs_at_once_is_a_concurrency_limit(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    sim.update(max_in_flight=1)
    ctx = context(rt, out)
    accepted(ctx, never_finishing(sim))

    t = steps.submit(ctx, record(1, status=LineStatus.SUBMITTING, seq=2))

    assert t.status is LineStatus.READY
    assert t.limit is not None and t.limit.kind == "concurrency"
    assert t.limit.named_limit == 1  # "Too many concurrent jobs (limit 1)"


def test_a_5xx_on_submit_costs_a_try_and_the_line_fails_after_http_retries(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    sim.update(faults={"error_5xx": 1.0})
    ctx = context(rt, out)
    rec = submitting()
    seen: list[Transition] = []

    while not seen or seen[-1].status is not LineStatus.FAILED:
        t = steps.submit(ctx, rec)
        seen.append(t)
        if t.row is None:
            assert t.status is LineStatus.READY and t.limit is None
            assert 0.0 <= t.due_in <= rt.settings.retry_base_s * 2 ** (len(seen) - 1)
            rec = advance(rec, t).evolve(status=LineStatus.SUBMITTING)
        assert len(seen) <= HTTP_RETRIES + 1

    assert [t.changes.get("tries") for t in seen[:-1]] == [1, 2]
    failed = seen[-1].row
    assert failed is not None and failed.error is not None
    assert failed.error.type == "provider_unavailable" and failed.error.retryable
    assert failed.attempts == 1 and failed.submitted_at is not None


def test_an_ambiguous_submit_keeps_its_slot_and_is_counted_when_tried_again(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    sim.update(faults={"drop_after_accept": 1.0})
    ctx = context(rt, out)
    rec = submitting("openai")

    lost = steps.submit(ctx, rec)

    assert lost.status is LineStatus.SUBMITTING  # the job may exist: the slot stays taken
    assert lost.changes["tries"] == 1 and lost.row is None
    assert "ambiguous_submits" not in lost.counts

    sim.update(faults={"drop_after_accept": 0.0})
    again = steps.submit(ctx, advance(rec, lost))

    assert again.status is LineStatus.FETCHED
    assert again.counts["ambiguous_submits"] == 1  # OpenAI may have billed the lost one
    assert submits(sim) == 2


def test_a_submit_retried_after_a_5xx_is_not_counted_as_ambiguous(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    sim.update(faults={"error_5xx": 1.0})
    ctx = context(rt, out)
    rec = submitting("openai")
    refused = steps.submit(ctx, rec)
    assert refused.status is LineStatus.READY and refused.changes["tries"] == 1
    sim.update(faults={"error_5xx": 0.0})
    # The scheduler hands the READY line out again: pump.lua marks it SUBMITTING.
    again = advance(rec, refused).evolve(status=LineStatus.SUBMITTING, seq=rec.seq + 1)

    t = steps.submit(ctx, again)

    assert t.status is LineStatus.FETCHED
    assert "ambiguous_submits" not in t.counts  # the 503 was answered: nothing was bought


def test_an_ambiguous_submit_to_an_idempotent_provider_buys_nothing_twice(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    sim.update(faults={"drop_after_accept": 1.0})
    ctx = context(rt, out)
    rec = submitting()

    lost = steps.submit(ctx, rec)
    sim.update(faults={"drop_after_accept": 0.0})
    again = steps.submit(ctx, advance(rec, lost))

    assert lost.status is LineStatus.SUBMITTING
    assert again.status is LineStatus.SUBMITTED
    assert "ambiguous_submits" not in again.counts
    assert submits(sim) == 1 and sim.ledger()["replays"] == 1


def test_a_402_fails_the_line_and_stops_the_batch(rt: Runtime, out: Path, sim: Simulator) -> None:
    sim.update(credits=0.0)

    t = steps.submit(context(rt, out), submitting())

    assert t.status is LineStatus.FAILED
    assert t.stop is not None and t.stop[0] == "insufficient_credits"
    assert t.row is not None and t.row.error is not None
    assert t.row.error.type == "insufficient_credits"
    assert t.counts == {"submit_requests": 1}


def test_a_line_that_fails_without_spending_gives_its_budget_hold_back(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    sim.update(credits=0.0)
    rec = submitting().evolve(reserved=SIMULATOR_PRICE)

    t = steps.submit(context(rt, out, budget="100"), rec)

    assert t.status is LineStatus.FAILED
    assert t.counts["reserved"] == -SIMULATOR_PRICE


def test_openai_s_insufficient_quota_429_stops_the_batch_rather_than_waiting(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    sim.update(credits=0.0)

    t = steps.submit(context(rt, out), submitting("openai"))

    assert t.status is LineStatus.FAILED and t.limit is None
    assert t.stop is not None and t.stop[0] == "insufficient_credits"


def test_a_refused_key_fails_the_line_and_stops_the_batch(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    t = steps.submit(context(rt, out), submitting("apiframe"))  # 403: key inactive

    assert t.status is LineStatus.FAILED
    assert t.stop is not None and t.stop[0] == "auth"
    assert "afk_inactive_key" not in t.stop[1]


def test_a_bad_key_at_a_sync_provider_fails_the_line_and_stops_the_batch(
    redis_client: redis.Redis[bytes], redis_url: str, sim: Simulator, out: Path
) -> None:
    bad = make_runtime(redis_url, sim, openai_api_key="invalid-key")
    try:
        t = steps.submit(context(bad, out), submitting("openai"))
    finally:
        bad.close()

    assert t.status is LineStatus.FAILED
    assert t.stop is not None and t.stop[0] == "auth"


def test_a_content_policy_refusal_at_submit_fails_only_the_line(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    t = steps.submit(context(rt, out), submitting("openai", prompt="a [[policy]] case"))

    assert t.status is LineStatus.FAILED and t.stop is None
    assert t.row is not None and t.row.error is not None
    assert t.row.error.type == "content_policy" and not t.row.error.retryable


def test_a_line_over_the_budget_fails_before_anything_is_sent(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    t = steps.submit(context(rt, out, budget="10"), submitting())

    assert t.status is LineStatus.FAILED
    assert t.row is not None and t.row.error is not None and t.row.error.type == "budget"
    assert t.row.attempts == 0 and t.row.submitted_at is None
    assert requests(sim) == 0
    assert "reserved" not in rt.state.counters(BATCH)


def test_a_line_within_the_budget_holds_its_estimate(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    t = steps.submit(context(rt, out, budget="100"), submitting())

    assert t.status is LineStatus.SUBMITTED
    assert t.changes["reserved"] == SIMULATOR_PRICE
    assert rt.state.counters(BATCH)["reserved"] == SIMULATOR_PRICE


def test_a_line_that_already_holds_its_estimate_does_not_reserve_again(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    rec = submitting().evolve(reserved=SIMULATOR_PRICE)

    t = steps.submit(context(rt, out, budget="30"), rec)

    assert t.status is LineStatus.SUBMITTED and "reserved" not in t.changes
    assert "reserved" not in rt.state.counters(BATCH)


def test_a_budget_in_usd_converts_the_estimate_at_the_configured_rate(
    redis_client: redis.Redis[bytes], redis_url: str, sim: Simulator, out: Path
) -> None:
    priced = make_runtime(redis_url, sim, usd_per_credit_simulator=0.01)
    try:
        t = steps.submit(context(priced, out, budget="1", budget_currency="USD"), submitting())
    finally:
        priced.close()

    assert t.status is LineStatus.SUBMITTED
    assert t.changes["reserved"] == pytest.approx(0.24)


def test_a_budget_in_usd_without_a_rate_refuses_the_line(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    t = steps.submit(context(rt, out, budget="1", budget_currency="USD"), submitting())

    assert t.status is LineStatus.FAILED
    assert t.row is not None and t.row.error is not None and t.row.error.type == "budget"
    assert requests(sim) == 0


def test_a_line_past_its_deadline_fails_with_timeout_without_a_request(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    rec = submitting().evolve(deadline=time.time() - 1, submitted_at="2026-01-01T00:00:00Z")

    t = steps.submit(context(rt, out), rec)

    assert t.row is not None and t.row.error is not None and t.row.error.type == "timeout"
    assert requests(sim) == 0


def test_a_line_of_a_cancelled_batch_fails_without_being_bought(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    t = steps.submit(context(rt, out, status="cancelled"), submitting())

    assert t.status is LineStatus.FAILED
    assert t.row is not None and t.row.error is not None and t.row.error.type == "cancelled"
    assert requests(sim) == 0


def test_a_line_of_a_stopping_batch_fails_with_the_stop_s_reason(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(
        rt,
        out,
        status="stopping",
        stop_reason="insufficient_credits",
        stop_message="apiframe answered 402: Insufficient credits",
    )

    t = steps.submit(ctx, submitting())

    assert t.row is not None and t.row.error is not None
    assert t.row.error.type == "insufficient_credits"
    assert t.row.error.message == "apiframe answered 402: Insufficient credits"
    assert requests(sim) == 0


def test_a_line_of_an_interrupted_batch_is_held_not_failed(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    t = steps.submit(context(rt, out, status="interrupted"), submitting())

    assert t.status is LineStatus.READY and t.row is None
    assert t.changes == {}  # same attempt, same key when the command resumes it
    assert t.due_in >= 600
    assert requests(sim) == 0


# -- poll -----------------------------------------------------------------------------------------


def test_a_pending_job_stays_submitted_and_is_polled_again(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, never_finishing(sim)).evolve(tries=1)

    before = time.time()
    t = steps.poll(ctx, rec)

    assert t.status is LineStatus.SUBMITTED and t.outcome == "pending"
    assert t.changes.keys() == {"polls", "tries", "poll_at"}
    assert (t.changes["polls"], t.changes["tries"]) == (1, 0)
    initial = rt.settings.poll_initial_s
    assert 0.8 * initial <= t.due_in <= 1.2 * initial
    # ...and the line remembers when its next poll is due, for a task handed it early
    assert before + t.due_in - 0.01 <= t.changes["poll_at"] <= time.time() + t.due_in
    assert t.counts == {"polls": 1}


def test_a_poll_handed_out_ahead_of_its_time_is_sent_when_it_is_due(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, never_finishing(sim))
    due = time.time() + 0.08

    steps.poll(ctx, rec.evolve(poll_at=due))

    assert time.time() >= due
    assert sim.ledger()["requests"].get("GET /v2/jobs/{id} 200", 0) == 1


def test_a_poll_due_far_ahead_waits_no_longer_than_the_dispatcher_s_lead(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    """A ``poll_at`` left from an earlier plan (or a clock that jumped) never holds a task."""
    ctx = context(rt, out)
    rec = accepted(ctx, never_finishing(sim))

    started = time.monotonic()
    t = steps.poll(ctx, rec.evolve(poll_at=time.time() + 600))

    assert t.outcome == "pending"
    assert time.monotonic() - started < policy.POLL_LEAD_S + 1.0


def test_a_job_that_never_finishes_on_a_zero_latency_simulator_polls_as_pending(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, submitting(prompt="a slow one [[never-finish]]"))  # latency_s = 0

    t = steps.poll(ctx, rec)

    assert t.outcome == "pending"


@pytest.mark.usefixtures("no_waits")
def test_in_testing_mode_a_pending_job_is_polled_again_at_once(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, never_finishing(sim))

    assert steps.poll(ctx, rec).due_in == 0.0


def test_a_finished_job_is_fetched_with_its_urls_cost_and_latency(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, submitting(n=2))

    t = steps.poll(ctx, rec)

    assert t.status is LineStatus.FETCHED and t.outcome == "completed"
    urls = [spec["url"] for spec in t.changes["artifacts"]]
    assert urls == [f"{sim.base_url}/cdn/images/{rec.job_id}-{k}.png" for k in (1, 2)]
    assert t.changes["credits"] == 2 * SIMULATOR_PRICE  # APIFrame's creditCost
    assert t.latency_s is not None and t.latency_s >= 0.0
    assert t.counts == {"polls": 1}


def test_a_transiently_failed_job_is_bought_again_as_a_new_attempt(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, submitting(prompt="a flaky one [[fail-once]]"))

    t = steps.poll(ctx, rec)

    assert t.status is LineStatus.READY and t.row is None
    assert t.changes["attempt"] == 2 and t.changes["job_id"] == ""
    again = accepted(ctx, advance(rec, t).evolve(status=LineStatus.SUBMITTING))
    assert again.job_id != rec.job_id
    assert steps.poll(ctx, again).status is LineStatus.FETCHED
    keys_used = [job["idempotency_key"] for job in sim.ledger()["jobs"]]
    assert keys_used == [steps.idempotency_key(BATCH, rec.id, n) for n in (1, 2)]


def test_a_failed_job_on_the_line_s_last_attempt_fails_the_line(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    last = submitting(prompt="a flaky one [[fail-once]]").evolve(attempt=3)
    rec = accepted(ctx, last)

    t = steps.poll(ctx, rec)

    assert t.status is LineStatus.FAILED
    assert t.row is not None and t.row.error is not None and t.row.error.type == "job_failed"
    assert t.row.attempts == 3


def test_attempts_of_an_earlier_run_do_not_count_against_this_one(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    # An earlier run used attempts 1 and 2; this run started at 3 and may make three more.
    resumed = submitting(prompt="a flaky one [[fail-once]]").evolve(attempt=3, first_attempt=3)
    rec = accepted(ctx, resumed)

    t = steps.poll(ctx, rec)

    assert t.status is LineStatus.READY and t.changes["attempt"] == 4


def test_a_job_refused_for_content_policy_fails_the_line(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, submitting(prompt="a [[policy]] case"))

    t = steps.poll(ctx, rec)

    assert t.status is LineStatus.FAILED
    assert t.row is not None and t.row.error is not None
    assert t.row.error.type == "content_policy"
    assert submits(sim) == 1


def test_a_job_the_provider_lost_is_bought_again(rt: Runtime, out: Path, sim: Simulator) -> None:
    rec = record(status=LineStatus.SUBMITTED, seq=2, job_id=str(uuid.uuid4()))

    t = steps.poll(context(rt, out), rec)

    assert t.status is LineStatus.READY and t.changes["attempt"] == 2


def test_a_poll_the_provider_refuses_fails_the_line(rt: Runtime, out: Path, sim: Simulator) -> None:
    rec = record(status=LineStatus.SUBMITTED, seq=2, job_id="not-a-uuid")

    t = steps.poll(context(rt, out), rec)

    assert t.row is not None and t.row.error is not None
    assert t.row.error.type == "provider_rejected"
    assert t.counts == {"polls": 1}


def test_a_webhook_saying_the_job_completed_makes_the_transition_a_poll_would(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, never_finishing(sim))
    done = Finished([Artifact(url="https://cdn.example/1.png")], credits=9.0, latency_s=3.5)

    t = steps.finished_by_webhook(ctx, rec, done)

    assert t.status is LineStatus.FETCHED
    assert t.changes["artifacts"] == ({"url": "https://cdn.example/1.png"},)
    assert t.changes["credits"] == 9.0 and t.latency_s == 3.5
    assert t.counts == {"webhooks": 1}


def test_a_webhook_saying_the_job_failed_buys_a_new_attempt(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, never_finishing(sim))

    t = steps.failed_by_webhook(ctx, rec, JobFailed("Upstream provider timeout", retryable=True))

    assert t.status is LineStatus.READY and t.changes["attempt"] == 2
    assert t.counts == {"webhooks": 1}


def test_a_429_on_poll_keeps_the_job_and_costs_no_try(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, submitting())
    sim.update(faults={"error_429": 1.0})

    t = steps.poll(ctx, rec)

    assert t.status is LineStatus.SUBMITTED and t.changes == {}
    assert t.limit == LimitEvent("rate", Step.POLL, 1.0)
    assert t.counts == {"polls": 1, "throttled": 1}


def test_a_5xx_on_poll_is_retried_past_http_retries(rt: Runtime, out: Path, sim: Simulator) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, submitting()).evolve(tries=10 * HTTP_RETRIES)
    sim.update(faults={"error_5xx": 1.0})

    t = steps.poll(ctx, rec)

    assert t.status is LineStatus.SUBMITTED  # a read is never billed: poll on to the deadline
    assert t.changes == {"tries": 10 * HTTP_RETRIES + 1}


def test_a_poll_past_the_line_s_deadline_fails_with_timeout(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, never_finishing(sim)).evolve(deadline=time.time() - 1)
    polled_before = requests(sim)

    t = steps.poll(ctx, rec)

    assert t.row is not None and t.row.error is not None and t.row.error.type == "timeout"
    assert rec.job_id in t.row.error.message
    assert requests(sim) == polled_before


def test_a_paid_job_of_a_cancelled_batch_still_lands(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    rec = accepted(context(rt, out), submitting())

    t = steps.poll(context(rt, out, status="cancelled"), rec)

    assert t.status is LineStatus.FETCHED


def test_with_webhooks_polling_is_only_the_slow_fallback(
    redis_client: redis.Redis[bytes], redis_url: str, sim: Simulator, out: Path
) -> None:
    hooked = make_runtime(redis_url, sim, webhook_url="http://127.0.0.1:9")
    try:
        ctx = context(hooked, out)
        rec = never_finishing(sim)
        t = steps.submit(ctx, rec)
        rec = advance(rec, t)
        pending = steps.poll(ctx, rec)
    finally:
        hooked.close()

    fallback = hooked.settings.webhook_poll_s
    assert t.due_in == fallback and pending.due_in == fallback
    seen = httpx.get(f"{sim.base_url}/v2/jobs/{rec.job_id}", headers={"X-API-Key": SIM_KEY})
    assert seen.json()["input"]["webhookUrl"] == hooked.settings.webhook_callback_url()


# -- store ----------------------------------------------------------------------------------------


def test_store_uploads_every_image_with_its_checksum_and_ends_the_line(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = fetched(ctx, n=2, metadata={"sku": "1001"})

    t = store.store(ctx, rec)

    assert t.status is LineStatus.SUCCEEDED and t.row is not None
    row = t.row
    assert (row.status, row.job_id, row.credits, row.attempts) == (
        "succeeded",
        rec.job_id,
        2 * SIMULATOR_PRICE,
        1,
    )
    assert row.metadata == {"sku": "1001"} and row.error is None
    assert [image.uri for image in row.images] == [
        str(out.resolve() / BATCH / "images" / rec.id / f"{k}.png") for k in (0, 1)
    ]
    for image in row.images:
        data = Path(image.uri).read_bytes()
        assert hashlib.sha256(data).hexdigest() == image.sha256
        assert (image.bytes, image.content_type) == (len(data), "image/png")
        assert (image.width, image.height) == (1024, 1024)


def test_store_makes_the_report_previews_of_the_first_lines_while_their_bytes_are_at_hand(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    early = fetched(ctx, n=2)
    late = early.evolve(idx=rt.settings.report_previews, id="late-line")

    store.store(ctx, early)
    store.store(ctx, late)

    thumbs = out / BATCH / "report" / "thumbs"
    assert sorted(p.name for p in thumbs.iterdir()) == [f"{early.id}-0.webp", f"{early.id}-1.webp"]
    with Image.open(thumbs / f"{early.id}-0.webp") as preview:
        assert preview.format == "WEBP" and max(preview.size) == previews.THUMB_PX


def test_store_makes_no_preview_when_the_report_is_to_have_none(
    redis_client: redis.Redis[bytes], redis_url: str, out: Path, sim: Simulator
) -> None:
    without = make_runtime(redis_url, sim, report_previews=0)
    try:
        ctx = context(without, out)
        t = store.store(ctx, fetched(ctx))
    finally:
        without.close()

    assert t.status is LineStatus.SUCCEEDED
    assert not (out / BATCH / "report").exists()


def test_store_of_a_sync_line_uploads_the_images_kept_in_redis(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, submitting("openai"))
    (spec,) = rec.artifacts
    blob = rt.state.get_blob(spec["blob"])

    t = store.store(ctx, rec)

    assert t.row is not None and t.row.status == "succeeded"
    assert Path(t.row.images[0].uri).read_bytes() == blob


def test_an_image_not_on_the_cdn_yet_is_fetched_again_without_buying_again(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = fetched(ctx)
    sim.update(faults={"cdn_lag": 1.0})

    lagging = store.store(ctx, rec)

    assert lagging.status is LineStatus.FETCHED and lagging.changes == {"misses": 1}
    assert lagging.due_in > 0
    assert not (out / BATCH / "images").exists()

    t = store.store(ctx, advance(rec, lagging))

    assert t.status is LineStatus.SUCCEEDED
    assert submits(sim) == 1


def test_an_image_that_stays_missing_reads_the_job_again_for_fresh_urls(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = fetched(ctx)
    stale = rec.evolve(
        artifacts=({"url": f"{sim.base_url}/cdn/images/{rec.job_id}-7.png"},),
        misses=rt.settings.download_retries,
    )

    t = store.store(ctx, stale)

    assert t.status is LineStatus.FETCHED and t.outcome == "fresh URLs"
    assert t.changes["artifacts"] == rec.artifacts
    assert submits(sim) == 1


def test_a_missing_image_whose_job_is_gone_is_bought_again(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = fetched(ctx)
    lost = rec.evolve(
        job_id=str(uuid.uuid4()),  # the provider no longer knows the job
        artifacts=({"url": f"{sim.base_url}/cdn/images/{rec.job_id}-7.png"},),
        misses=rt.settings.download_retries,
    )

    t = store.store(ctx, lost)

    assert t.status is LineStatus.READY and t.changes["attempt"] == 2


def test_a_missing_image_whose_job_cannot_be_read_now_is_looked_at_later(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = fetched(ctx)
    stale = rec.evolve(
        artifacts=({"url": f"{sim.base_url}/cdn/images/{rec.job_id}-7.png"},),
        misses=rt.settings.download_retries,
    )
    sim.update(faults={"error_5xx": 1.0})  # the API is down; its CDN answers

    t = store.store(ctx, stale)

    assert t.status is LineStatus.FETCHED and t.outcome == "retry"
    assert t.changes == {"misses": rt.settings.download_retries + 1}


def test_an_expired_image_means_a_new_attempt_owned_up_to(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = fetched(ctx)
    sim.update(cdn_ttl_s=0.0)  # purged from the CDN as soon as it finished

    seen = [store.store(ctx, rec)]
    while seen[-1].status is LineStatus.FETCHED:  # 404s: looked at again, then the job re-read
        rec = advance(rec, seen[-1])
        seen.append(store.store(ctx, rec))
        assert len(seen) <= 5

    t = seen[-1]
    assert t.status is LineStatus.READY, t.row
    assert t.changes["attempt"] == 2 and t.changes["job_id"] == ""
    assert t.counts == {"rebought_after_expiry": 1}


def test_an_inline_image_lost_before_it_was_stored_is_bought_again(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = accepted(ctx, submitting("openai"))
    rt.state.client.delete(rec.artifacts[0]["blob"])  # its TTL ran out

    t = store.store(ctx, rec)

    assert t.status is LineStatus.READY
    assert t.changes["attempt"] == 2 and t.changes["artifacts"] == ()
    assert t.counts == {"rebought_after_expiry": 1}


def test_storage_trouble_waits_with_the_images_instead_of_failing(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = fetched(ctx)
    (out / BATCH).mkdir(parents=True)
    (out / BATCH / "images").write_text("a file where the folder should be")

    t = store.store(ctx, rec)

    assert t.status is LineStatus.FETCHED and t.row is None
    assert t.changes["tries"] == 1 and t.changes["artifacts"] == rec.artifacts
    assert t.counts == {"storage_waits": 1}
    assert t.due_in >= 1.0


def test_storage_trouble_past_the_storage_deadline_fails_the_line(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = fetched(ctx)
    long_ago = time.time() - rt.settings.storage_deadline_s - 60
    (out / BATCH).mkdir(parents=True)
    (out / BATCH / "images").write_text("a file where the folder should be")

    t = store.store(ctx, rec.evolve(fetched_at=long_ago))

    assert t.row is not None and t.row.error is not None
    assert t.row.error.type == "storage_failed"


def test_an_image_key_taken_by_other_bytes_fails_the_line(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = fetched(ctx)
    taken = out / BATCH / "images" / rec.id / "0.png"
    taken.parent.mkdir(parents=True)
    taken.write_bytes(b"somebody else's image")

    t = store.store(ctx, rec)

    assert t.row is not None and t.row.error is not None
    assert t.row.error.type == "object_exists"
    assert taken.read_bytes() == b"somebody else's image"


def test_a_store_that_ran_before_stores_the_same_bytes_again(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = fetched(ctx)

    first, second = store.store(ctx, rec), store.store(ctx, rec)

    assert first.row is not None and second.row is not None
    assert first.row.images == second.row.images


def test_a_truncated_download_is_tried_again_then_fails_the_line(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = fetched(ctx)
    sim.update(faults={"cdn_truncated": 1.0})

    retry = store.store(ctx, rec)
    last = store.store(ctx, rec.evolve(tries=HTTP_RETRIES))

    assert retry.status is LineStatus.FETCHED and retry.changes == {"tries": 1}
    assert last.row is not None and last.row.error is not None
    assert last.row.error.type == "download_failed"
    assert not (out / BATCH / "images").exists()  # nothing uploaded from a bad download


def test_a_line_bought_in_parts_goes_back_for_the_next_part_and_keeps_the_first(
    rt: Runtime, out: Path, sim: Simulator
) -> None:
    ctx = context(rt, out)
    rec = submitting("aimlapi", n=2)  # AI/ML API: one image per call

    first = accepted(ctx, rec)
    part = store.store(ctx, first)

    assert part.status is LineStatus.READY and part.outcome == "next part"
    assert len(part.changes["images"]) == 1

    second = accepted(ctx, advance(first, part).evolve(status=LineStatus.SUBMITTING))
    t = store.store(ctx, second)

    assert t.row is not None and t.row.status == "succeeded"
    assert [Path(image.uri).name for image in t.row.images] == ["0.png", "1.png"]
    jobs = sim.ledger()["jobs"]
    assert [job["images"] for job in jobs] == [1, 1]
    assert [job["idempotency_key"] for job in jobs] == [None, None]  # AI/ML API has none
    assert t.row.credits == pytest.approx(2 * 88.4)  # AI/ML API's own credits_used
