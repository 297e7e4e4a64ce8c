"""A batch after its first run: ``retry`` buys only what failed, ``cancel`` stops new submits
and still finalizes every line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import redis

from jobs.clock import now_iso
from jobs.output.batch_info import write_info
from jobs.simulator import Simulator, SimulatorConfig
from jobs.storage import LocalStore
from tests.harness import (
    check_invariants,
    read_local,
    run_batch,
    run_cli,
    start_worker,
    stop,
    wait_for,
)

KEY = "afk_lifecycle_test_key"


def manifest(tmp_path: Path, count: int, special: dict[int, str] | None = None) -> Path:
    path = tmp_path / "manifest.jsonl"
    lines = []
    for i in range(count):
        prompt = f"a ceramic bowl number {i}" + (special or {}).get(i, "")
        lines.append(
            {"id": f"bowl-{i}", "prompt": prompt, "size": "1024x1024", "output_format": "png"}
        )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_retry_resubmits_only_the_failed_lines(tmp_path: Path) -> None:
    source = manifest(tmp_path, 6, {2: " [[fail-once]]"})
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=0.3)) as sim:
        env = {
            "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
            "IMAGEBATCH_APIFRAME_API_KEY": KEY,
            "IMAGEBATCH_MAX_ATTEMPTS": "1",
        }
        first = run_batch(
            str(source),
            "apiframe",
            str(out),
            "bowls",
            env=env,
        )
        assert first.returncode == 1, first.stdout + first.stderr
        rows = read_local(out, "bowls").rows
        assert [row.status for row in rows].count("failed") == 1
        assert rows[2].error is not None and rows[2].error.type == "job_failed"
        submits_before = sim.ledger()["submits"]

        # The batch remembers its provider: retry needs only its id and where it is.
        again = run_cli("retry", "bowls", "--out", str(out), env=env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "retrying 1 lines" in again.stdout
        outcome = read_local(out, "bowls")
        check_invariants(source, outcome, sim.ledger())
        assert all(row.status == "succeeded" for row in outcome.rows)
        assert sim.ledger()["submits"] == submits_before + 1
        assert outcome.rows[2].attempts == 2


def test_cancel_stops_new_submits_and_every_line_still_gets_a_row(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    source = manifest(tmp_path, 24)
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=1.5)) as sim:
        env = {
            "IMAGEBATCH_BROKER_URL": redis_url,
            "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
            "IMAGEBATCH_APIFRAME_API_KEY": KEY,
            "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": "2",
            "IMAGEBATCH_OUT": str(out),
        }
        submitted = run_cli(
            "submit", str(source), "--provider", "apiframe", "--batch-id", "cancel-me", env=env
        )
        assert submitted.returncode == 0, submitted.stderr
        worker = start_worker(env, "solo", tmp_path / "worker.log", concurrency=2)
        try:

            def some_done() -> bool:
                status = run_cli("status", "cancel-me", env=env).stdout
                return " 0/" not in status and "succeeded" in status

            wait_for(some_done, 60, "the first lines to finish", interval=0.5)
            cancelled = run_cli("cancel", "cancel-me", env=env)
            assert cancelled.returncode == 0, cancelled.stderr
            wait_for(
                lambda: "finished" in run_cli("status", "cancel-me", env=env).stdout,
                60,
                "the cancelled batch to finalize",
                interval=0.5,
            )
        finally:
            stop(worker)
        ledger = sim.ledger()
    outcome = read_local(out, "cancel-me")
    check_invariants(source, outcome, ledger, redis_client)
    statuses = [row.status for row in outcome.rows]
    assert 0 < statuses.count("succeeded") < 24
    cancelled_rows = [row for row in outcome.rows if row.status == "failed"]
    assert cancelled_rows and all(
        row.error is not None and row.error.type == "cancelled" for row in cancelled_rows
    )
    assert ledger["submits"] == statuses.count("succeeded")


def test_cancel_of_a_finished_embedded_batch_says_it_already_finished(tmp_path: Path) -> None:
    """The defect: it said "no broker: set IMAGEBATCH_BROKER_URL", which was not the trouble."""
    # Given a batch an embedded run finished
    source = manifest(tmp_path, 2)
    out = tmp_path / "out"
    done = run_batch(str(source), "simulator", str(out), "over")
    assert done.returncode == 0, done.stderr
    # When it is cancelled (no broker configured; the default output location)
    cancelled = run_cli("cancel", "over", cwd=tmp_path)
    # Then the answer is what is true: it already finished, nothing to cancel
    assert cancelled.returncode == 0, cancelled.stderr
    assert "already finished" in cancelled.stdout and "2 succeeded" in cancelled.stdout
    assert "BROKER" not in cancelled.stdout + cancelled.stderr


def test_report_and_cancel_of_a_batch_still_running_say_so(tmp_path: Path) -> None:
    """The defects: ``report`` of a running batch said "pass --out"; ``cancel`` of a batch an
    embedded run is running said "no broker"."""
    # Given the record a batch keeps while an embedded run in another terminal runs it
    out = tmp_path / "out"
    record = {"batch_id": "busy", "status": "running", "total": 300, "started_at": now_iso()}
    write_info(LocalStore(str(out)), "busy", record, {"done": 120.0, "succeeded": 120.0})
    # When its report is asked for, and it is cancelled
    report = run_cli("report", "busy", "--out", str(out))
    cancelled = run_cli("cancel", "busy", "--out", str(out))
    # Then each says it is still running (and how to stop it), not where to look
    assert report.returncode == 2
    assert "still running" in report.stderr and "120/300" in report.stderr, report.stderr
    assert "--out" not in report.stderr, report.stderr
    assert cancelled.returncode == 2
    assert "still running" in cancelled.stderr and "Ctrl-C" in cancelled.stderr, cancelled.stderr
    # ... and a batch that is nowhere is still "not found"
    missing = run_cli("report", "nowhere", "--out", str(out))
    assert missing.returncode == 2 and "no batch nowhere" in missing.stderr, missing.stderr
