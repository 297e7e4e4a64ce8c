"""A fault storm: 500 lines through ``imagebatch run`` while the provider misbehaves in every
way the simulator knows, at once. Nothing may be lost, and the money must add up.

Faults are drawn from one seeded RNG, but worker threads race for the draws, so which line
meets which fault differs from run to run; the assertions hold for any assignment.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import pytest

from jobs.simulator import Faults, Simulator, SimulatorConfig
from tests.harness import check_invariants, read_local, run_batch

pytestmark = pytest.mark.fault

LINES = 500
KEY = "afk_fault_storm_key_0123456789"
SIZES = ("1024x1024", "1536x1024", "1024x1536", "auto")
FORMATS = ("png", "jpeg", "webp")
QUALITIES = ("low", "medium", "high", "auto")
FAULTS = Faults(
    seed=20261123,
    error_5xx=0.05,
    error_429=0.02,  # each 429 pauses every worker for Retry-After: 1 s
    drop_after_accept=0.03,
    job_failed_transient=0.05,
    job_failed_policy=0.02,
    invalid_json=0.03,
    cdn_truncated=0.05,
    cdn_expired=0.02,
    slow=0.02,
    slow_s=1.0,
)
ENV = {
    "IMAGEBATCH_APIFRAME_API_KEY": KEY,
    "IMAGEBATCH_WORKER_CONCURRENCY": "16",
    "IMAGEBATCH_POLL_INITIAL_S": "0.2",
    "IMAGEBATCH_POLL_MAX_S": "0.2",
    "IMAGEBATCH_RETRY_BASE_S": "0.05",
    "IMAGEBATCH_RETRY_MAX_S": "0.5",
    # The client-side limiter is not under test here; the simulator sets no rate limit.
    "IMAGEBATCH_APIFRAME_REQUESTS_PER_SECOND": "1000",
    "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": "64",
}


def write_manifest(path: Path) -> list[dict[str, Any]]:
    lines = [
        {
            "id": f"storm-{k:04d}",
            "prompt": f"Storm test product photo number {k}: a {FORMATS[k % 3]} catalog shot",
            "n": 1,
            "size": SIZES[k % len(SIZES)],
            "output_format": FORMATS[k % len(FORMATS)],
            "quality": QUALITIES[(k // 3) % len(QUALITIES)],
            "metadata": {"k": k},
        }
        for k in range(LINES)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return lines


def test_every_line_ends_with_a_reason_and_the_ledger_reconciles_under_a_fault_storm(
    tmp_path: Path, record_property: Any
) -> None:
    # Given a 500-line manifest and a provider with every fault switched on
    manifest = tmp_path / "storm.jsonl"
    lines = write_manifest(manifest)
    out = tmp_path / "out"
    config = SimulatorConfig(latency_s=0.3, latency_jitter_s=0.1, faults=FAULTS)
    with Simulator(config) as sim:
        # When the batch runs on the embedded default against it
        started = time.monotonic()
        result = run_batch(
            manifest,
            "apiframe",
            str(out),
            "storm",
            env={**ENV, "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url},
            timeout=240,
        )
        elapsed = time.monotonic() - started
        ledger = sim.ledger()
        # Then (checked while the simulator still answers questions about its jobs)
        check_storm(manifest, lines, out, sim, result, elapsed, ledger, record_property)


def check_storm(
    manifest: Path,
    lines: list[dict[str, Any]],
    out: Path,
    sim: Simulator,
    result: subprocess.CompletedProcess[str],
    elapsed: float,
    ledger: dict[str, Any],
    record_property: Any,
) -> None:
    outcome = read_local(out, "storm")
    rows, summary = outcome.rows, outcome.summary
    statuses = Counter(row.status for row in rows)
    errors = Counter(row.error.type for row in rows if row.error is not None)
    jobs_by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for job in ledger["jobs"]:
        jobs_by_prompt[job["prompt"]].append(job)
    billed = {
        prompt: [j for j in jobs if j["credit_cost"] and j["status"] != "FAILED"]
        for prompt, jobs in jobs_by_prompt.items()
    }
    charged = ledger["credits_charged"].get("apiframe", 0)
    refunded = ledger["credits_refunded"].get("apiframe", 0)
    cdn = {k: v for k, v in ledger["requests"].items() if k.startswith("GET /cdn")}
    report = {
        "elapsed_s": round(elapsed, 1),
        "exit": result.returncode,
        "statuses": dict(statuses),
        "error_types": dict(errors),
        "attempts": dict(Counter(row.attempts for row in rows)),
        "ledger_submits": ledger["submits"],
        "ledger_replays": ledger["replays"],
        "ledger_dropped": sum(1 for j in ledger["jobs"] if j["dropped"]),
        "ledger_job_status": dict(Counter(j["status"] for j in ledger["jobs"])),
        "credits_charged": charged,
        "credits_refunded": refunded,
        "summary_credits": summary["credits"],
        "lines_billed_twice": sum(1 for jobs in billed.values() if len(jobs) > 1),
        "cdn_requests": cdn,
        "fault_rates": FAULTS.to_dict(),
        "requests": ledger["requests"],
        "summary": {
            k: summary.get(k)
            for k in (
                "submit_requests",
                "jobs_accepted",
                "ambiguous_submits",
                "rebought_after_expiry",
            )
        },
    }
    print("fault storm:", json.dumps(report, indent=1, sort_keys=True))
    for name, value in report.items():
        record_property(name, json.dumps(value, sort_keys=True))

    # Then every line ended succeeded or failed, and a failure says what happened
    assert result.returncode in (0, 1), result.stdout + result.stderr
    assert result.returncode == (0 if statuses["succeeded"] == LINES else 1)
    assert len(rows) == LINES and set(statuses) <= {"succeeded", "failed"}
    for row in rows:
        if row.status == "failed":
            assert row.error is not None and row.error.type and row.error.message, row
            assert row.error.type != "error", row
    assert [row.id for row in rows] == [line["id"] for line in lines]
    # The storm must not have turned into a wall of failures: with these rates almost every
    # line can be brought home (policy failures and exhausted retries are the legitimate rest).
    assert statuses["succeeded"] >= 0.9 * LINES, report
    # The faults really happened (otherwise this test proves nothing)
    assert ledger["replays"] > 0 and report["ledger_dropped"] > 0, report
    assert report["ledger_job_status"].get("FAILED", 0) > 0, report
    assert any("truncated" in k for k in cdn) and any(k.endswith(" 404") for k in cdn), report
    assert any(k.endswith(" 429") for k in ledger["requests"]), report
    assert any(k.endswith(" 503") for k in ledger["requests"]), report

    # A line may hold a second billed job only when its first job's image expired at the CDN
    # before it could be downloaded (ImageExpired: "only a new job can help"). Ask the
    # provider about every superseded billed job, with the faults switched off.
    superseded = [
        job
        for row in rows
        for job in billed.get(row.prompt or "", [])
        if job["id"] != row.job_id or row.status != "succeeded"
    ]
    expired = provider_says_expired(sim, [job["id"] for job in superseded])
    not_expired = [job for job in superseded if not expired[job["id"]]]
    assert not not_expired, f"lines billed twice without an expired image: {not_expired}"
    assert len(superseded) <= cdn.get("GET /cdn/images/{name} 404", 0), report

    # None lost, nothing double-billed, stored bytes match their rows, counts add up
    rebought = {job["id"] for job in superseded}
    paid_once = {**ledger, "jobs": [j for j in ledger["jobs"] if j["id"] not in rebought]}
    check_invariants(manifest, outcome, paid_once, idempotent=True)

    # The provider's ledger reconciles with what the batch reports it spent and bought:
    # every accepted submit answer we read is a new job or a replay, except new jobs whose
    # answer the dropped connection swallowed (each came back later as a replay)
    assert abs((charged - refunded) - summary["credits"]) < 1e-6, report
    dropped = report["ledger_dropped"]
    assert summary["jobs_accepted"] == ledger["submits"] - dropped + ledger["replays"], report
    assert summary["rebought_after_expiry"] <= len(superseded), report
    # Every succeeded line has exactly one billed, non-refunded job for its image: the one
    # whose image it stored; its row carries every billed job's cost (expired ones included)
    for row in rows:
        jobs = billed.get(row.prompt or "", [])
        if row.status == "succeeded":
            kept = [j["id"] for j in jobs if j["id"] not in rebought]
            assert kept == [row.job_id], (row.id, jobs)
        assert abs(row.credits - sum(j["credit_cost"] for j in jobs)) < 1e-6, (row.id, jobs)
    # No provider job was bought that no line accounts for
    assert set(jobs_by_prompt) <= {line["prompt"] for line in lines}
    assert elapsed < 120, report


def provider_says_expired(sim: Simulator, job_ids: list[str]) -> dict[str, bool]:
    """``GET /v2/jobs/{id}`` → ``expired`` for each job, after switching the faults off."""
    sim.update(faults=Faults())
    answers = {}
    with httpx.Client(base_url=sim.base_url, headers={"X-API-Key": KEY}, timeout=10) as client:
        for job_id in job_ids:
            response = client.get(f"/v2/jobs/{job_id}")
            response.raise_for_status()
            job = response.json()
            answers[job_id] = job["status"] == "COMPLETED" and job["expired"] is True
    return answers
