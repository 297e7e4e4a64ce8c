"""A pool line moves on only when its provider surely did not bill it, each move a new attempt
with a ``route`` entry; it never goes back to a provider that refused it or left the pool."""

from __future__ import annotations

from typing import Any

import pytest

from jobs.errors import (
    AmbiguousSubmit,
    BatchStop,
    JobFailed,
    PermanentProviderError,
    ProviderError,
    RateLimited,
    TransientProviderError,
)
from jobs.routing import queue_name
from jobs.settings import CoreSettings
from tests.runtime_support import record
from worker.lines.failover import Left, move_on
from worker.lines.records import LineRecord, LineStatus

POOL = ("aimlapi", "apiframe", "openai")
SETTINGS = CoreSettings(_env_file=None, retry_base_s=0, http_retries=2)  # type: ignore[call-arg]


def line(provider: str = "aimlapi", queue: tuple[str, ...] = POOL, **changes: Any) -> LineRecord:
    return record(0, provider=provider, pool=POOL, queue=queue_name(queue), **changes)


def test_only_errors_that_prove_nothing_was_billed_move_a_line() -> None:
    assert TransientProviderError("503").moves and PermanentProviderError("400").moves
    assert BatchStop("402").moves and RateLimited("429").moves
    assert JobFailed("FAILED", retryable=True).moves
    assert not AmbiguousSubmit("sent, no answer").moves


@pytest.mark.parametrize(
    ("exc", "left"),
    [
        (TransientProviderError("aimlapi answered 503"), Left.UNAVAILABLE),
        (PermanentProviderError("aimlapi answered 400"), Left.REFUSED),
        (BatchStop("aimlapi answered 402"), Left.OUT),
        (JobFailed("ended FAILED", retryable=True), Left.FAILED),
        (JobFailed("content policy", retryable=False), Left.REFUSED),
    ],
)
def test_a_line_moves_to_its_next_candidate_as_a_new_attempt(
    exc: ProviderError, left: Left
) -> None:
    rec = line(attempt=3, job_id="job-1", reserved=0.004)
    t = move_on(SETTINGS, rec, exc, frozenset)
    assert t.status is LineStatus.READY and t.due_in == 0
    assert t.changes["queue"] == "@apiframe,openai"
    assert t.changes["attempt"] == 4 and t.changes["job_id"] == ""
    assert t.changes["route"] == (
        {"provider": "aimlapi", "outcome": left.value, "reason": exc.message},
    )
    assert t.counts["reserved"] == -0.004  # the next provider holds its own price
    assert t.leave == (("aimlapi", exc.message) if left is Left.OUT else None)


def test_a_provider_that_left_the_pool_is_skipped() -> None:
    t = move_on(SETTINGS, line(), TransientProviderError("503"), lambda: {"apiframe"})
    assert t.changes["queue"] == "@openai"


def test_after_every_candidate_the_line_starts_over_without_those_that_refused_it() -> None:
    route = (
        {"provider": "aimlapi", "outcome": "refused", "reason": "400"},
        {"provider": "apiframe", "outcome": "unavailable", "reason": "503"},
    )
    rec = line(provider="openai", queue=("openai",), route=route)
    t = move_on(SETTINGS, rec, TransientProviderError("openai answered 502"), frozenset)
    assert t.status is LineStatus.READY
    assert t.changes["queue"] == "@apiframe,openai"
    assert t.changes["tries"] == 1


def test_a_line_no_candidate_can_take_fails_naming_each_reason() -> None:
    route = (
        {"provider": "aimlapi", "outcome": "refused", "reason": "aimlapi answered 400"},
        {"provider": "apiframe", "outcome": "out", "reason": "apiframe answered 402"},
    )
    rec = line(provider="openai", queue=("openai",), route=route, submitted_at="2026-12-07")
    t = move_on(SETTINGS, rec, PermanentProviderError("openai answered 400"), frozenset)
    assert t.status is LineStatus.FAILED and t.row is not None and t.row.error is not None
    message = t.row.error.message
    assert "aimlapi answered 400" in message and "apiframe answered 402" in message
    assert "openai answered 400" in message
    assert [step.provider for step in t.row.route] == ["aimlapi", "apiframe", "openai"]


def test_rounds_over_an_unavailable_pool_end_after_the_retries() -> None:
    rec = line(provider="openai", queue=("openai",), tries=2)
    t = move_on(SETTINGS, rec, TransientProviderError("openai answered 503"), frozenset)
    assert t.status is LineStatus.FAILED
