"""Logs a fleet can ship: a worker started with ``IMAGEBATCH_LOG_FORMAT=json`` writes one JSON
object per line, every event about a line carries its batch, line id, job id, provider, step
and outcome, the provider key appears nowhere, and per-request HTTP logs (httpx) appear only
when the worker logs at DEBUG."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from jobs.simulator import Simulator, SimulatorConfig
from tests.e2e.test_secrets import leaks, new_key
from tests.harness import (
    check_invariants,
    read_local,
    run_batch,
    run_cli,
    start_worker,
    stop,
    wait_for,
)
from worker.redis import keys

LINE_FIELDS = ("batch", "line_id", "job_id", "provider", "step", "outcome")
CONTEXT = ("batch", "line_id", "provider", "step")


def write_manifest(path: Path) -> Path:
    lines = [
        {"id": f"log-{k}", "prompt": f"a brass compass, variant {k}", "quality": "low"}
        for k in range(5)
    ]
    lines.append({"id": "log-policy", "prompt": "[[policy]] a flagged compass", "quality": "low"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def run_logged_batch(
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis[Any],
    loglevel: str,
) -> tuple[str, list[str]]:
    """A 6-line batch (one content-policy failure) through one JSON-logging worker
    (``tests.harness.start_worker``); returns the key used and the worker's log lines."""
    key = new_key()
    manifest = write_manifest(tmp_path / "logs.jsonl")
    out = tmp_path / "out"
    batch = f"logs-{loglevel.lower()}"
    log = tmp_path / f"worker-{batch}.log"
    with Simulator(SimulatorConfig(latency_s=0.3)) as sim:
        env = {
            "IMAGEBATCH_BROKER_URL": redis_url,
            "IMAGEBATCH_APIFRAME_API_KEY": key,
            "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
            "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": "2",
            "IMAGEBATCH_OUT": str(out),
            "IMAGEBATCH_LOG_FORMAT": "json",
            "IMAGEBATCH_LOG_LEVEL": loglevel,
        }
        args = ["submit", str(manifest), "--provider", "apiframe", "--batch-id", batch]
        submitted = run_cli(*args, env=env)
        assert submitted.returncode == 0, submitted.stderr
        worker = start_worker(env, f"logs-{batch}", log)
        try:
            wait_for(
                lambda: redis_client.hget(keys.batch(batch), "summary"),
                60,
                "the batch to finish",
                interval=0.3,
            )
        finally:
            stop(worker)
        ledger = sim.ledger()
    check_invariants(manifest, read_local(out, batch), ledger, redis_client)
    return key, log.read_text().splitlines()


def parsed(lines: list[str]) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            raise AssertionError(f"log line {number} is not JSON: {line!r}") from None
        assert isinstance(record, dict), line
        records.append(record)
    return records


@pytest.fixture(scope="module")
def info_run(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str
) -> tuple[str, list[dict[str, Any]], str]:
    """One batch through a JSON worker at INFO: (key, parsed records, raw log)."""
    with redis.Redis.from_url(redis_url) as client:
        client.flushall()
        key, lines = run_logged_batch(tmp_path_factory.mktemp("logs"), redis_url, client, "INFO")
    return key, parsed([line for line in lines if line.strip()]), "\n".join(lines)


def test_a_json_worker_logs_one_object_per_line_with_each_lines_context(
    info_run: tuple[str, list[dict[str, Any]], str],
) -> None:
    key, records, raw = info_run
    assert records, "the worker logged nothing"
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys(), record
    events = [r for r in records if r["logger"] == "imagebatch.lines"]
    outcomes = Counter(r["outcome"] for r in events)
    print("line events:", dict(outcomes))
    # every line was logged as it moved, with the whole context
    assert {r["line_id"] for r in events} == {f"log-{k}" for k in range(5)} | {"log-policy"}
    for record in events:
        missing = [name for name in LINE_FIELDS if not record.get(name)]
        assert not missing, (missing, record)
        assert record["batch"] == "logs-info" and record["provider"] == "apiframe"
        assert record["job_id"] != "None", record
    assert {r["step"] for r in events} >= {"submit", "poll"}
    ended = {r["line_id"]: r["outcome"] for r in events if r["outcome"] != "accepted"}
    assert "content_policy" in ended["log-policy"], ended
    assert all(ended[f"log-{k}"] == "succeeded" for k in range(5)), ended
    # no per-request HTTP logs at INFO
    assert not [r for r in records if r["logger"].startswith(("httpx", "httpcore"))]
    # the key is nowhere in the log
    assert leaks(key, {"worker log": raw.encode()}) == []


def test_every_record_about_a_line_carries_its_context_and_failures_are_warnings(
    info_run: tuple[str, list[dict[str, Any]], str],
) -> None:
    _, records, _ = info_run
    ids = {f"log-{k}" for k in range(5)} | {"log-policy"}
    about_lines = [
        r for r in records if r.get("line_id") or any(i in r["message"].split() for i in ids)
    ]
    assert about_lines
    for record in about_lines:
        missing = [name for name in CONTEXT if not record.get(name)]
        assert not missing, (missing, record)
    failed = [r for r in about_lines if r.get("line_id") == "log-policy" and "fail" in r["message"]]
    assert failed and all(r["level"] in ("WARNING", "ERROR") for r in failed), failed


def test_at_debug_the_http_requests_are_logged_too_still_json_and_without_the_key(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    key, lines = run_logged_batch(tmp_path, redis_url, redis_client, "DEBUG")
    records = parsed([line for line in lines if line.strip()])
    http = [r for r in records if r["logger"] == "httpx"]
    assert any("POST" in r["message"] and "/v2/images/generate" in r["message"] for r in http)
    assert leaks(key, {"worker log": "\n".join(lines).encode()}) == []


def test_a_json_run_writes_one_json_object_per_stderr_line_each_naming_its_batch(
    tmp_path: Path,
) -> None:
    """The defect: ``IMAGEBATCH_LOG_FORMAT=json imagebatch run …`` printed no JSON at all: its
    rejections and progress records were plain text and the lines' outcomes not logged."""
    manifest = tmp_path / "mixed.jsonl"
    lines = [
        {"id": "ok-1", "prompt": "a brass key"},
        {"id": "typo", "prompt": "a brass key", "qualty": "high"},
        {"id": "flagged", "prompt": "a brass key [[policy]]"},
        {"id": "ok-2", "prompt": "a brass lock"},
    ]
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    env = {
        "IMAGEBATCH_LOG_FORMAT": "json",
        "IMAGEBATCH_PROGRESS_INTERVAL_S": "0.5",
        "IMAGEBATCH_EMBEDDED_SIMULATOR_LATENCY_S": "1.5",
    }
    # When a run is asked for JSON logs (its stdout and stderr both piped)
    result = run_batch(manifest, "simulator", tmp_path / "out", "mixed", env=env, timeout=90)
    assert result.returncode == 1, result.stdout + result.stderr
    # Then every stderr line is a JSON object naming the batch
    records = parsed(result.stderr.splitlines())
    assert records and all(r.get("batch") == "mixed" for r in records), records
    by_event = Counter(r.get("event") for r in records)
    assert by_event["started"] == 1 and by_event["finished"] == 1, by_event
    # ... the rejection, with its line and reason
    [rejected] = [r for r in records if r.get("event") == "rejected"]
    assert rejected["line"] == 2 and "qualty" in rejected["reason"], rejected
    # ... progress records, with their counts as numbers
    progress = [r for r in records if r.get("event") == "progress"]
    assert progress, by_event
    for record in progress:
        assert record["total"] == 4
        pending = record["waiting"] + record["submitted"] + record["storing"]
        assert pending == 4 - record["done"], record
    # ... and each bought line's outcome
    outcomes = {
        r["line_id"]: r["outcome"]
        for r in records
        if r["logger"] == "imagebatch.lines" and r["outcome"] != "accepted"
    }
    assert outcomes["ok-1"] == outcomes["ok-2"] == "succeeded", outcomes
    assert "content_policy" in outcomes["flagged"], outcomes
    # stdout keeps the result lines, and the progress went to the log
    assert result.stdout.splitlines()[0].startswith("batch mixed · 4 lines"), result.stdout
    assert result.stdout.splitlines()[-1].startswith("done · 2 succeeded · 1 failed"), result.stdout
    assert "progress " not in result.stdout
