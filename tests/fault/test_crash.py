"""Fault tests (docs/invariants.md, the fault scenarios): kill, duplicate, wipe and starve
a real fleet, then check that nothing was lost and nothing was bought twice.

Every test runs the production code paths against real servers (redis-server, SeaweedFS,
the provider simulator over HTTP) and ends with the one oracle, ``check_invariants``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import redis
from pydantic import SecretStr

from jobs.manifest.spool import spool
from jobs.output import layout, parts
from jobs.settings import Settings
from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import (
    Outcome,
    check_invariants,
    read_local,
    read_s3,
    run_cli,
    start_worker,
    stop,
    wait_for,
)
from tests.servers import S3Server
from worker.lines.faults import POINTS
from worker.redis import keys
from worker.redis.keys import QUEUE

KEY = "afk_crash_test_key_0123456789abcdef"
LINES = 30
FAULT = {
    # A dead worker's lines are dispatched again when their 5 s lease runs out (a live
    # worker renews it every second or two): recovery takes seconds, not an hour.
    "IMAGEBATCH_VISIBILITY_TIMEOUT_S": "10",
    "IMAGEBATCH_LEASE_S": "5",
}
GENERATE = "POST /v2/images/generate"

pytestmark = pytest.mark.fault


# --- helpers ---------------------------------------------------------------------------------


def write_manifest(path: Path, count: int, marked: dict[int, str] | None = None) -> Path:
    """``count`` lines with unique prompts; ``marked`` adds a simulator marker to some lines."""
    lines = []
    for i in range(count):
        prompt = f"Studio photo of product number {i:03d} on a grey seamless background"
        if marked and i in marked:
            prompt += f" {marked[i]}"
        line = {"id": f"line-{i:03d}", "prompt": prompt, "size": "1024x1024"}
        lines.append(json.dumps({**line, "output_format": "png"}))
    path.write_text("\n".join(lines) + "\n")
    return path


def fleet_env(
    redis_url: str, s3: S3Server, bucket: str, sim: Simulator, **extra: str
) -> dict[str, str]:
    return {
        "IMAGEBATCH_BROKER_URL": redis_url,
        "IMAGEBATCH_APIFRAME_API_KEY": KEY,
        "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
        "IMAGEBATCH_OUT": f"s3://{bucket}/runs",
        **FAULT,
        **s3.env(),
        **extra,
    }


def submit(manifest: Path, batch: str, env: dict[str, str]) -> None:
    done = run_cli("submit", str(manifest), "--provider", "apiframe", "--batch-id", batch, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == batch


class Fleet:
    """Worker processes of one test; every one it starts is stopped by ``stop_all``."""

    def __init__(self, env: dict[str, str], logs: Path, concurrency: int = 4) -> None:
        self.env, self.logs, self.concurrency = env, logs, concurrency
        self.workers: list[subprocess.Popen[bytes]] = []

    def start(self, *options: str) -> subprocess.Popen[bytes]:
        name = f"w{len(self.workers) + 1}"
        log = self.logs / f"{name}.log"
        worker = start_worker(self.env, name, log, self.concurrency, *options)
        self.workers.append(worker)
        return worker

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None]

    def stop_all(self) -> None:
        for worker in self.workers:
            stop(worker)

    def log_tail(self, chars: int = 3000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}"
            for p in sorted(self.logs.glob("w*.log"))
        )


@contextmanager
def fleet(env: dict[str, str], logs: Path, size: int = 2) -> Iterator[Fleet]:
    workers = Fleet(env, logs)
    try:
        for _ in range(size):
            workers.start()
        yield workers
    finally:
        workers.stop_all()


def done_count(client: redis.Redis[Any], batch: str) -> int:
    if client.hget(keys.batch(batch), "summary"):
        return LINES
    return int(float(client.hget(keys.counters(batch), "done") or 0))


def stuck_lines(client: redis.Redis[Any], batch: str) -> str:
    """What Redis knows about the lines not yet finished (for a timeout's message)."""
    now = time.time()
    report = [f"batches={client.smembers(keys.BATCHES)} meta={client.hgetall(keys.batch(batch))}"]
    for key in sorted(client.scan_iter(match=keys.line_pattern(batch))):
        item = {k.decode(): v.decode()[:80] for k, v in client.hgetall(key).items()}
        item.pop("request", None)
        member = keys.member(batch, int(key.decode().rsplit(":", 1)[1]))
        scores = {
            zset: client.zscore(zset, member)
            for zset in (keys.ready(batch, "apiframe"), keys.flight("apiframe"), keys.STORE)
        }
        due = {z.split(":")[1]: round(s - now, 1) for z, s in scores.items() if s is not None}
        report.append(f"{member}: due_in={due} {item}")
    queues = {k.decode(): client.llen(k) for k in client.scan_iter(match="imagebatch*")}
    report.append(f"queues={queues} unacked={client.hlen('unacked')}")
    return "\n".join(report)


def finished(client: redis.Redis[Any], batch: str) -> bool:
    return bool(client.hget(keys.batch(batch), "summary"))


def wait_finished(
    client: redis.Redis[Any],
    batch: str,
    workers: Fleet,
    timeout: float,
    *,
    lines: int = LINES,
    until: Callable[[], bool] | None = None,
) -> None:
    """Wait for the batch's summary (or ``until``); a timeout says what Redis and the workers
    know, which is all a fault test's failure has to go on."""
    try:
        wait_for(until or (lambda: finished(client, batch)), timeout, f"batch {batch} to finish")
    except AssertionError:
        raise AssertionError(
            f"{done_count(client, batch)}/{lines} done\n"
            f"{stuck_lines(client, batch)}\n{workers.log_tail()}"
        ) from None


def billed(ledger: dict[str, Any]) -> Counter[str]:
    """Billed (not refunded) provider jobs per prompt."""
    return Counter(
        job["prompt"] for job in ledger["jobs"] if job["credit_cost"] and job["status"] != "FAILED"
    )


def submit_requests(ledger: dict[str, Any]) -> int:
    """Every POST to the generate endpoint the simulator answered, whatever the status."""
    return sum(n for label, n in ledger["requests"].items() if label.startswith(GENERATE))


def durable_ids(s3: S3Server, bucket: str, batch: str) -> set[str]:
    """Line ids whose row is in a part file (``runs/BATCH/.state/parts/``) as succeeded."""
    prefix = f"runs/{layout.part_key(batch, 0).rsplit('/', 1)[0]}/"
    ids = set()
    for page in s3.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            data = s3.client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            for row in parts.decode_entries(data).values():
                parsed = json.loads(row)
                if parsed["status"] == "succeeded":
                    ids.add(parsed["id"])
    return ids


def saved_counters(s3: S3Server, bucket: str, batch: str) -> dict[str, float]:
    """The counters a batch's last flush saved in ``runs/BATCH/.state/batch.json``."""
    body = s3.client.get_object(Bucket=bucket, Key=f"runs/{layout.info_key(batch)}")["Body"]
    counters: dict[str, float] = json.loads(body.read())["counters"]
    return counters


def assert_all_succeeded(outcome: Outcome) -> None:
    assert [row.status for row in outcome.rows] == ["succeeded"] * LINES, [
        (row.id, row.status, row.error) for row in outcome.rows if row.status != "succeeded"
    ]


# --- 1, 2, 3: SIGKILL at every crash point -----------------------------------------------------


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_at_crash_point_loses_no_line_and_buys_nothing_twice(
    point: str,
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis[Any],
    s3: S3Server,
    s3_bucket: str,
) -> None:
    # Given a 30-line batch on two workers, one of which will SIGKILL itself at `point`
    manifest = write_manifest(tmp_path / "manifest.jsonl", LINES)
    marker = tmp_path / "crashed"
    batch = f"kill-{point.replace('_', '-')}"
    exited: dict[int, int | None] = {}
    with Simulator(SimulatorConfig(latency_s=0.8, latency_jitter_s=0.4)) as sim:
        env = fleet_env(
            redis_url,
            s3,
            s3_bucket,
            sim,
            IMAGEBATCH_CRASH_AT=point,
            IMAGEBATCH_CRASH_MARKER=str(marker),
        )
        submit(manifest, batch, env)
        with fleet(env, tmp_path) as workers:
            # When a worker dies, a replacement is started (as a supervisor would)
            def progress() -> bool:
                for worker in list(workers.workers):
                    if worker.poll() is not None and worker.pid not in exited:
                        exited[worker.pid] = worker.returncode
                        workers.start()
                return finished(redis_client, batch)

            wait_finished(redis_client, batch, workers, 60, until=progress)
        ledger = sim.ledger()

    # Then the crash really happened, once, and the batch still finished cleanly
    assert marker.exists(), f"no worker reached the {point} crash point"
    assert list(exited.values()) == [-signal.SIGKILL], exited
    outcome = read_s3(s3.client, s3_bucket, "runs", batch)
    check_invariants(manifest, outcome, ledger, redis_client, idempotent=True)
    assert_all_succeeded(outcome)
    # ...and every line was bought exactly once (a re-POST only replayed its own job)
    assert ledger["submits"] == LINES, ledger["submits"]
    assert set(billed(ledger).values()) == {1}
    if point == "after_submit":
        assert ledger["replays"] >= 1, "the killed submit was not retried with the same key"
    assert len({row.job_id for row in outcome.rows}) == LINES


def test_messages_the_broker_loses_are_dispatched_again_when_their_lease_runs_out(
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis[Any],
    s3: S3Server,
    s3_bucket: str,
) -> None:
    """A broker restarted without persistence, or a worker killed holding prefetched
    messages, loses tasks. Every dispatched line carries a lease in Redis, so the scheduler
    sends its step again once the lease runs out: a lost message delays a line, never loses
    it, and never buys it twice."""
    # Given a batch whose first dispatched messages the broker loses: the only worker is a
    # leader that schedules but consumes another queue, and the queue is emptied for 2 seconds
    manifest = write_manifest(tmp_path / "manifest.jsonl", 12)
    batch = "lost-messages"
    lost = 0
    with Simulator(SimulatorConfig(latency_s=0.5)) as sim:
        env = fleet_env(redis_url, s3, s3_bucket, sim)
        submit(manifest, batch, env)
        with fleet(env, tmp_path, size=0) as workers:
            workers.start("--queues=imagebatch-nobody-sends-here")
            wait_for(lambda: redis_client.llen(QUEUE), 30, "the scheduler to dispatch", 0.01)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline:
                pipe = redis_client.pipeline()
                pipe.llen(QUEUE)
                pipe.delete(QUEUE)
                lost += int(pipe.execute()[0])
                time.sleep(0.02)
            # When a worker that consumes the queue joins, and the broker keeps its messages
            workers.start()
            wait_finished(redis_client, batch, workers, 60, lines=12)
        ledger = sim.ledger()

    # Then messages really were lost, and every line was still bought once and finished
    assert lost > 0, "no message was lost: the test proved nothing"
    outcome = read_s3(s3.client, s3_bucket, "runs", batch)
    check_invariants(manifest, outcome, ledger, redis_client, idempotent=True)
    assert [row.status for row in outcome.rows] == ["succeeded"] * 12
    assert set(billed(ledger).values()) == {1}


# --- 4: duplicate delivery ---------------------------------------------------------------------


def test_duplicate_delivery_changes_nothing(
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from worker import runtime
    from worker.batch import start, status
    from worker.celery import app as celery_app
    from worker.celery import tasks
    from worker.celery.embedded import in_process_worker
    from worker.dispatch import runner

    # Given an in-process worker whose every dispatched task is sent twice
    manifest = write_manifest(tmp_path / "manifest.jsonl", 20)
    batch = "dup"
    original, handoffs = tasks.CeleryDispatch.step, runner.HANDOFFS_PER_TASK
    sent: Counter[str] = Counter()

    def twice(self: Any, step: Any, batch: str, lines: Any) -> None:
        sent[str(step)] += len(lines)
        original(self, step, batch, lines)
        original(self, step, batch, lines)

    with Simulator(SimulatorConfig(latency_s=0.8, latency_jitter_s=0.4)) as sim:
        # Per-provider fields are generated from the registry: mypy does not know them.
        apiframe: dict[str, Any] = {
            "apiframe_base_url": sim.base_url,
            "apiframe_api_key": SecretStr(KEY),
        }
        settings = Settings(
            broker_url=redis_url,
            **apiframe,
            out=str(tmp_path / "doubled"),
            poll_initial_s=0.2,
            poll_max_s=0.5,
            retry_base_s=0.05,
            retry_max_s=0.5,
            visibility_timeout_s=10,
            lease_s=5,
        )
        rt = runtime.configure(settings)
        app = celery_app.configure(settings, redis_url)

        def run_batch(out: Path) -> Outcome:
            spooled = spool([manifest.read_bytes()])
            try:
                started = start.start_batch(
                    rt, spooled, batch=batch, out=str(out), provider="apiframe"
                )
            finally:
                Path(spooled.path).unlink(missing_ok=True)
            assert started.plan.valid == 20 and not started.carried, started
            wait_for(
                lambda: (snap := status.from_redis(rt.state, batch)) is not None and snap.finished,
                60,
                "the batch to finish",
            )
            return read_local(out, batch)

        try:
            with in_process_worker(app, 8):
                # When every task is delivered twice (every submit, too: none is handed straight
                # to a slot a finished line freed, which would go out as no task of its own)
                monkeypatch.setattr(tasks.CeleryDispatch, "step", twice)
                monkeypatch.setattr(runner, "HANDOFFS_PER_TASK", 0)
                doubled = run_batch(tmp_path / "doubled")
                after_doubled = sim.ledger()
                # ...and the same batch is run again cleanly into another store, as the reference
                monkeypatch.setattr(tasks.CeleryDispatch, "step", original)
                monkeypatch.setattr(runner, "HANDOFFS_PER_TASK", handoffs)
                clean = run_batch(tmp_path / "clean")
                after_clean = sim.ledger()
        finally:
            runtime.reset()

    # Then every step really was sent twice...
    assert sent["submit"] >= 20 and sent["poll"] >= 20, sent
    # ...yet each line was POSTed once and bought once: no second copy reached the provider
    check_invariants(manifest, doubled, after_doubled, redis_client, idempotent=True)
    assert after_doubled["submits"] == 20 and after_doubled["replays"] == 0, after_doubled
    assert submit_requests(after_doubled) == 20
    assert doubled.summary["submit_requests"] == 20
    # ...and the results are those of a clean run: statuses, ids, jobs and image checksums
    check_invariants(manifest, clean, after_clean, redis_client, idempotent=True)
    assert after_clean["submits"] == 20 and after_clean["replays"] == 20
    assert_same_results(doubled, clean)


def assert_same_results(got: Outcome, want: Outcome) -> None:
    def shape(outcome: Outcome) -> list[tuple[Any, ...]]:
        return [
            (row.line, row.id, row.status, row.job_id, row.credits, [i.sha256 for i in row.images])
            for row in outcome.rows
        ]

    assert shape(got) == shape(want)
    assert all(row.status == "succeeded" for row in got.rows)
    assert got.objects == want.objects
    for key in ("total", "succeeded", "failed", "rejected", "credits"):
        assert got.summary[key] == want.summary[key], key


# --- 5: Redis wiped mid-run --------------------------------------------------------------------


def test_redis_wiped_mid_run_then_same_command_again_resubmits_no_stored_line(
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis[Any],
    s3: S3Server,
    s3_bucket: str,
) -> None:
    # Given a batch half done on a fleet (few provider slots, so lines finish in waves)
    manifest = write_manifest(tmp_path / "manifest.jsonl", LINES)
    batch = "wiped"
    with Simulator(SimulatorConfig(latency_s=2.0, latency_jitter_s=0.5)) as sim:
        env = fleet_env(redis_url, s3, s3_bucket, sim, IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT="6")
        submit(manifest, batch, env)
        (tmp_path / "before").mkdir()
        with fleet(env, tmp_path / "before") as workers:

            def half_done() -> bool:
                # Read from Redis, not `status`: a CLI start on a loaded machine takes longer
                # than a wave of jobs. The stop drains a few more: about half.
                return done_count(redis_client, batch) >= LINES * 2 // 5

            wait_for(half_done, 60, "about half of the lines to finish", interval=0.1)
            # When the workers stop and Redis (broker and state) is wiped
            workers.stop_all()
        stored_before = durable_ids(s3, s3_bucket, batch)
        ledger_before = sim.ledger()
        assert 0 < len(stored_before) < LINES, "the wipe must come mid-run"
        saved_before = saved_counters(s3, s3_bucket, batch)
        redis_client.flushall()

        # ...and the same submit command is run again on a fresh fleet
        (tmp_path / "after").mkdir()
        with fleet(env, tmp_path / "after") as workers:
            submit(manifest, batch, env)
            wait_finished(redis_client, batch, workers, 90)
            final = run_cli("status", batch, env=env)
        ledger = sim.ledger()

    # Then it finishes with every line, and Redis holds nothing of it but its summary
    assert f"{LINES}/{LINES} done · {LINES} succeeded" in final.stdout, final.stdout
    outcome = read_s3(s3.client, s3_bucket, "runs", batch)
    check_invariants(manifest, outcome, ledger, redis_client, idempotent=True)
    assert_all_succeeded(outcome)
    # ...no line was bought twice (lines in flight at the wipe got their own job back)...
    assert set(billed(ledger).values()) == {1}
    assert ledger["submits"] == LINES
    # ...and no line with a durable record was submitted again at all
    prompts = {row.id: row.prompt or "" for row in outcome.rows}
    before, after = billed(ledger_before), billed(ledger)
    for line_id in stored_before:
        assert after[prompts[line_id]] == before[prompts[line_id]] == 1, line_id
    # ...while each line bought before the wipe but not yet stored got its own job back
    bought_before = {job["prompt"] for job in ledger_before["jobs"]}
    in_flight = bought_before - {prompts[line_id] for line_id in stored_before}
    assert in_flight, "the wipe must catch lines in flight"
    assert ledger["replays"] == len(in_flight), (ledger["replays"], len(in_flight))
    resubmitted = submit_requests(ledger) - submit_requests(ledger_before)
    assert resubmitted == LINES - len(stored_before), (resubmitted, len(stored_before))
    # ...and the summary adds what the wiped run sent (as its last flush saved it) to the rest
    sent_before = int(saved_before.get("submit_requests", 0))
    assert len(stored_before) <= sent_before <= submit_requests(ledger_before), sent_before
    assert outcome.summary["submit_requests"] == sent_before + resubmitted
    carried = {row.id: row for row in outcome.rows if row.id in stored_before}
    assert all(row.job_id for row in carried.values())


# --- 9: warm shutdown ---------------------------------------------------------------------------


def test_warm_shutdown_then_restart_finishes_without_rerunning_finished_work(
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis[Any],
    s3: S3Server,
    s3_bucket: str,
) -> None:
    # Given a batch running on two workers
    manifest = write_manifest(tmp_path / "manifest.jsonl", LINES)
    batch = "warm"
    with Simulator(SimulatorConfig(latency_s=1.0, latency_jitter_s=0.5)) as sim:
        env = fleet_env(redis_url, s3, s3_bucket, sim, IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT="6")
        submit(manifest, batch, env)
        with fleet(env, tmp_path) as workers:
            wait_for(lambda: done_count(redis_client, batch) >= 8, 60, "8 lines to finish")
            # When one worker gets SIGTERM (Celery's warm shutdown) mid-run
            first = workers.workers[0]
            first.send_signal(signal.SIGTERM)
            first.wait(30)
            assert not finished(redis_client, batch), "the shutdown must come mid-run"
            # ...and a replacement starts
            workers.start()
            wait_finished(redis_client, batch, workers, 90)
        ledger = sim.ledger()

    # Then the drained worker exited cleanly and nothing it finished was run again
    assert first.returncode == 0, first.returncode
    outcome = read_s3(s3.client, s3_bucket, "runs", batch)
    check_invariants(manifest, outcome, ledger, redis_client, idempotent=True)
    assert_all_succeeded(outcome)
    assert ledger["submits"] == LINES
    assert ledger["replays"] == 0, "a finished submit was run again"
    assert submit_requests(ledger) == LINES
    assert outcome.summary["submit_requests"] == LINES


# --- 8: a job that never finishes ---------------------------------------------------------------


def test_a_line_whose_job_never_finishes_fails_by_deadline_and_the_rest_finish(
    tmp_path: Path,
) -> None:
    # Given a manifest where one line's provider job never finishes, and a 6 s line deadline
    manifest = write_manifest(tmp_path / "manifest.jsonl", 6, marked={2: "[[never-finish]]"})
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=0.5)) as sim:
        env = {
            "IMAGEBATCH_APIFRAME_API_KEY": KEY,
            "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
            "IMAGEBATCH_LINE_DEADLINE_S": "6",
        }
        # When the batch runs (embedded Redis and worker)
        started = time.monotonic()
        result = run_cli(
            "run",
            str(manifest),
            "--provider",
            "apiframe",
            "--out",
            str(out),
            "--batch-id",
            "deadline",
            env=env,
            timeout=60,
        )
        elapsed = time.monotonic() - started
        ledger = sim.ledger()

    # Then the run ends (exit 1: a line failed) soon after the deadline, not never
    assert result.returncode == 1, result.stdout + result.stderr
    assert "5 succeeded · 1 failed" in result.stdout, result.stdout
    assert elapsed < 30, elapsed
    outcome = read_local(out, "deadline")
    # The stuck job is paid (its credits are held while it runs) but can never store an image;
    # the oracle counts billed images beyond stored ones as double spend, so it gets the
    # settled jobs, and the stuck one is checked on its own below: bought once, never again.
    settled = [job for job in ledger["jobs"] if "[[never-finish]]" not in job["prompt"]]
    check_invariants(manifest, outcome, {**ledger, "jobs": settled}, idempotent=True)
    stuck = outcome.rows[2]
    assert stuck.status == "failed" and stuck.error is not None, stuck
    assert stuck.error.type == "timeout", stuck.error
    assert stuck.job_id, "the row names the job that never finished"
    assert [row.status for i, row in enumerate(outcome.rows) if i != 2] == ["succeeded"] * 5
    # ...and the stuck line was bought once, never resubmitted
    assert billed(ledger)[stuck.prompt or ""] == 1
    assert ledger["submits"] == 6


# --- a dead worker's lines, with the default lease ------------------------------------------


def test_a_dead_workers_lines_are_taken_over_within_a_minute_with_the_default_lease(
    tmp_path: Path,
    redis_url: str,
    redis_client: redis.Redis[Any],
    s3: S3Server,
    s3_bucket: str,
) -> None:
    """The defect: with two workers and one SIGKILLed mid-run, its lines sat for the whole
    300 s lease while ``status`` said "ETA 1s". A short lease kept alive by the heartbeat lets
    another worker take over within about a minute."""
    # Given a batch on two workers with imagebatch's default lease (no FAULT settings)
    manifest = write_manifest(tmp_path / "manifest.jsonl", 40)
    batch = "takeover"
    with Simulator(SimulatorConfig(latency_s=1.0, max_in_flight=8)) as sim:
        env = {
            "IMAGEBATCH_BROKER_URL": redis_url,
            "IMAGEBATCH_APIFRAME_API_KEY": KEY,
            "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
            "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": "8",
            "IMAGEBATCH_OUT": f"s3://{s3_bucket}/runs",
            **s3.env(),
        }
        submit(manifest, batch, env)
        with fleet(env, tmp_path) as workers:
            wait_for(lambda: done_count(redis_client, batch) >= 10, 60, "10 lines to finish")
            # When one of them is killed outright, with lines dispatched to it
            victim = workers.workers[0]
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            killed = time.monotonic()
            wait_finished(redis_client, batch, workers, 90, lines=40)
            took = time.monotonic() - killed
        ledger = sim.ledger()

    # Then the survivor finished the batch within about a minute of the kill...
    assert took < 60, took
    # ...and nothing was lost or bought twice
    outcome = read_s3(s3.client, s3_bucket, "runs", batch)
    check_invariants(manifest, outcome, ledger, redis_client, idempotent=True)
    assert [row.status for row in outcome.rows] == ["succeeded"] * 40
    assert set(billed(ledger).values()) == {1}
