"""Rate limits as a client meets them: which requests spend which bucket, 429s the provider
sends for its own reasons, and OpenAI's ``x-ratelimit-*`` headers."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from jobs.simulator import Simulator, SimulatorConfig

KEY = "afk_limits_key"
TOKEN = "sk-limits"
HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests")


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(latency_s=0.2, sync_latency_s=0.02)) as simulator:
        yield simulator


@pytest.fixture
def api(sim: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers={"X-API-Key": KEY}, timeout=5) as client:
        yield client


def submit(api: httpx.Client, prompt: str = "a blue teapot") -> httpx.Response:
    return api.post("/v2/images/generate", json={"prompt": prompt, "model": "gpt-image-1.5"})


def openai(sim: Simulator, **body: Any) -> httpx.Response:
    return httpx.post(
        sim.url_for("openai") + "/v1/images/generations",
        json={"model": "gpt-image-1.5", "prompt": "a lighthouse", **body},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=5,
    )


def seconds(duration: str) -> float:
    """OpenAI's reset duration (``1s``, ``6m0s``, ``120ms``, ``1.5s``) in seconds."""
    found = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m(?!s))?(?:([\d.]+)s)?(?:(\d+)ms)?", duration)
    assert found and duration, f"not a duration: {duration!r}"
    hours, minutes, secs, ms = found.groups()
    return 3600 * int(hours or 0) + 60 * int(minutes or 0) + float(secs or 0) + int(ms or 0) / 1000


# -- which requests spend which bucket ----------------------------------------------------------


def test_with_scope_submits_polls_are_never_limited_by_the_submit_bucket(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(rate_limit_scope="submits", rate_limit_rps=0.5, rate_limit_burst=1)
    accepted = submit(api)
    assert accepted.status_code == 202
    assert submit(api, "another").status_code == 429
    job_id = accepted.json()["jobId"]
    polls = [api.get(f"/v2/jobs/{job_id}").status_code for _ in range(20)]
    assert polls == [200] * 20
    assert api.get("/v2/me").status_code == api.get("/v2/jobs").status_code == 200
    assert sim.ledger()["rate_limited"]["rate"] == 1


def test_with_scope_all_polls_spend_the_same_bucket_as_submits(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(rate_limit_rps=0.5, rate_limit_burst=1)
    job_id = submit(api).json()["jobId"]
    assert api.get(f"/v2/jobs/{job_id}").status_code == 429


def test_with_scope_submits_reads_spend_their_own_bucket(sim: Simulator, api: httpx.Client) -> None:
    sim.update(rate_limit_scope="submits", read_rate_limit_rps=2)
    reads = [api.get("/v2/me") for _ in range(3)]
    assert [r.status_code for r in reads] == [200, 200, 429], "burst = one second of reads"
    assert reads[2].json() == {"error": "Rate limit exceeded"}
    assert int(reads[2].headers["Retry-After"]) >= 1
    assert submit(api).status_code == 202, "submits are not limited by the read bucket"
    limited = sim.ledger()["rate_limited"]
    assert (limited["read_rate"], limited["rate"]) == (1, 0)


def test_sync_generations_spend_the_submit_bucket_and_model_lookups_do_not(
    sim: Simulator,
) -> None:
    sim.update(rate_limit_scope="submits", rate_limit_rps=0.5, rate_limit_burst=1)
    assert openai(sim).status_code == 200
    refused = openai(sim)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    models = sim.url_for("oxen") + "/api/ai/models/gpt-image-1-5"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert [httpx.get(models, headers=auth).status_code for _ in range(3)] == [200] * 3


# -- 429s for the provider's own reasons ---------------------------------------------------------


def test_submit_429_refuses_every_submit_and_nothing_else(
    sim: Simulator, api: httpx.Client
) -> None:
    job_id = submit(api).json()["jobId"]
    sim.update(faults={"submit_429": 1})
    refused = submit(api, "another")
    assert (refused.status_code, refused.headers["Retry-After"]) == (429, "1")
    assert "error" in refused.json()
    sync = openai(sim)
    assert sync.status_code == 429 and sync.headers["Retry-After"] == "1"
    assert sync.json()["error"]["code"] == "rate_limit_exceeded"
    assert api.get(f"/v2/jobs/{job_id}").status_code == 200
    assert api.get("/v2/me").status_code == api.get("/v2/jobs").status_code == 200
    ledger = sim.ledger()
    assert ledger["submits"] == 1, "a refused submit bills nothing"
    assert ledger["rate_limited"] == {"concurrency": 0, "rate": 0, "read_rate": 0, "fault": 2}


# -- x-ratelimit-* headers -----------------------------------------------------------------------


def test_no_ratelimit_headers_unless_asked(sim: Simulator, api: httpx.Client) -> None:
    sim.update(rate_limit_rps=1, rate_limit_burst=1)
    answers = [api.get("/v2/me"), api.get("/v2/me")]
    assert [r.status_code for r in answers] == [200, 429]
    assert not any(h.startswith("x-ratelimit") for r in answers for h in r.headers)


def test_ratelimit_headers_count_down_and_say_when_the_bucket_is_full_again(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(ratelimit_headers=True, rate_limit_rps=2, rate_limit_burst=3)
    answers = [api.get("/v2/me") for _ in range(4)]
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert {r.headers["x-ratelimit-limit-requests"] for r in answers} == {"120"}
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in answers]
    assert remaining == [2, 1, 0, 0]
    resets = [seconds(r.headers["x-ratelimit-reset-requests"]) for r in answers]
    assert 0.4 < resets[0] <= 0.5 and 1.3 < resets[2] <= 1.5, resets
    assert answers[3].headers["Retry-After"] == "1"


def test_ratelimit_headers_only_on_requests_a_limit_applies_to(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(
        ratelimit_headers=True, rate_limit_scope="submits", rate_limit_rps=10, rate_limit_burst=5
    )
    accepted = submit(api)
    assert accepted.headers["x-ratelimit-remaining-requests"] == "4"
    assert seconds(accepted.headers["x-ratelimit-reset-requests"]) == pytest.approx(0.1, abs=0.02)
    poll = api.get(f"/v2/jobs/{accepted.json()['jobId']}")
    assert not any(h in poll.headers for h in HEADERS), "no read limit: no headers"
    sync = openai(sim, quality="unknown")
    assert sync.status_code == 400 and sync.headers["x-ratelimit-limit-requests"] == "600"


def test_ratelimit_headers_show_the_bucket_on_fault_answers_without_spending_it(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(ratelimit_headers=True, rate_limit_rps=1, rate_limit_burst=3)
    assert api.get("/v2/me").headers["x-ratelimit-remaining-requests"] == "2"
    sim.update(faults={"error_5xx": 1})
    unavailable = api.get("/v2/me")
    assert unavailable.status_code == 503
    assert unavailable.headers["x-ratelimit-remaining-requests"] == "2"
