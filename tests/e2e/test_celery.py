"""imagebatch in the Celery ecosystem: ``celery -A worker.app inspect ping`` reaches an
imagebatch worker with nothing but ``IMAGEBATCH_BROKER_URL`` set; a *plain* ``celery -A
worker.app worker`` consumes imagebatch's queue and runs its scheduler, so a submitted batch
finishes on it; and Flower (``imagebatch flower``) shows that worker and our tasks over its
HTTP API (``/api/workers``, ``/api/tasks``), a task whose line failed as FAILURE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import (
    CLI,
    ROOT,
    check_invariants,
    cli_env,
    read_local,
    run_cli,
    start_worker,
    stop,
    wait_for,
)
from tests.servers import free_port
from worker.redis import keys

CELERY = [sys.executable, "-m", "celery", "-A", "worker.app"]


def only_broker(redis_url: str) -> dict[str, str]:
    """The environment of an operator's shell: no IMAGEBATCH_ setting but the broker."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    return {**env, "IMAGEBATCH_BROKER_URL": redis_url}


@contextmanager
def process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as handle:
        started = subprocess.Popen(argv, env=env, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        yield started
    finally:
        stop(started)


def test_celery_inspect_ping_answers_from_an_imagebatch_worker(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    env = {"IMAGEBATCH_BROKER_URL": redis_url}
    worker = start_worker(env, "pingme", tmp_path / "worker.log", concurrency=2)
    try:

        def pinged() -> subprocess.CompletedProcess[str] | None:
            answer = subprocess.run(
                [*CELERY, "inspect", "ping", "--timeout=2"],
                env=only_broker(redis_url),
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
                cwd=ROOT,
            )
            return answer if answer.returncode == 0 else None

        answer = wait_for(pinged, 40, "the worker to answer ping", interval=0.5)
        queues = subprocess.run(
            [*CELERY, "inspect", "active_queues", "--timeout=2", "--json"],
            env=only_broker(redis_url),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            cwd=ROOT,
        )
    finally:
        stop(worker)
    assert "pingme@" in answer.stdout and "pong" in answer.stdout, answer.stdout
    assert queues.returncode == 0, queues.stderr
    consumed = json.loads(queues.stdout)
    names = {q["name"] for worker_queues in consumed.values() for q in worker_queues}
    assert names == {"imagebatch"}, consumed


def manifest(path: Path) -> Path:
    lines = [
        {"id": f"cel-{k}", "prompt": f"a copper kettle, variant {k}", "quality": "low"}
        for k in range(6)
    ]
    lines.append({"id": "cel-policy", "prompt": "[[policy]] a flagged kettle", "quality": "low"})
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_a_plain_celery_worker_runs_a_batch_and_flower_shows_it_and_its_failed_task(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    source = manifest(tmp_path / "kettles.jsonl")
    out = tmp_path / "out"
    port = free_port()
    flower_api = f"http://127.0.0.1:{port}/api"
    with Simulator(SimulatorConfig(latency_s=0.5)) as sim:
        env = cli_env(
            {
                "IMAGEBATCH_BROKER_URL": redis_url,
                "IMAGEBATCH_APIFRAME_API_KEY": "afk_celery_test_key",
                "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
                "IMAGEBATCH_OUT": str(out),
            }
        )
        plain_worker = [
            *CELERY, "worker", "--pool=threads", "--concurrency=4", "--hostname=plain@%h",
            "--loglevel=INFO",
        ]  # fmt: skip
        flower = [*CLI, "flower", f"--port={port}", "--address=127.0.0.1"]
        flower_env = {**env, "FLOWER_UNAUTHENTICATED_API": "true"}
        with (
            process(plain_worker, env, tmp_path / "plain.log") as worker,
            process(flower, flower_env, tmp_path / "flower.log") as board,
        ):

            def workers() -> dict[str, Any] | None:
                assert board.poll() is None, (tmp_path / "flower.log").read_text()[-3000:]
                try:
                    got = httpx.get(f"{flower_api}/workers?refresh=1", timeout=10)
                except httpx.HTTPError:
                    return None
                seen: dict[str, Any] = got.json() if got.status_code == 200 else {}
                return seen if any(name.startswith("plain@") for name in seen) else None

            listed = wait_for(workers, 60, "Flower to list the plain worker", interval=0.5)
            submitted = run_cli(
                "submit", str(source), "--provider", "apiframe", "--batch-id", "kettles",
                env=env,
            )  # fmt: skip
            assert submitted.returncode == 0, submitted.stderr
            wait_for(
                lambda: redis_client.hget(keys.batch("kettles"), "summary"),
                60,
                "the batch to finish on the plain worker",
                interval=0.3,
            )

            def tasks() -> dict[str, Any] | None:
                got = httpx.get(f"{flower_api}/tasks", timeout=10).json()
                states = {task["state"] for task in got.values()}
                finalized = any(t["name"] == "imagebatch.finalize" for t in got.values())
                return got if "FAILURE" in states and finalized else None

            seen = wait_for(tasks, 30, "Flower to see the failed task and finalize")
            assert worker.poll() is None
        ledger = sim.ledger()

    # The plain worker did the work (its scheduler dispatched; it consumed imagebatch's queue)
    outcome = read_local(out, "kettles")
    check_invariants(source, outcome, ledger, redis_client)
    assert [row.status for row in outcome.rows] == ["succeeded"] * 6 + ["failed"]
    plain_log = (tmp_path / "plain.log").read_text()
    assert "imagebatch.submit" in plain_log and "dispatches for the fleet" in plain_log
    # Flower listed the worker with imagebatch's queue, and saw our tasks on it
    (name,) = [n for n in listed if n.startswith("plain@")]
    assert {q["name"] for q in listed[name].get("active_queues", [])} == {"imagebatch"}
    names = {task["name"] for task in seen.values()}
    assert {"imagebatch.submit", "imagebatch.poll", "imagebatch.finalize"} <= names, names
    assert all(task.get("worker", "").startswith("plain@") for task in seen.values())
    failed = [task for task in seen.values() if task["state"] == "FAILURE"]
    assert len(failed) == 1, failed
    assert "cel-policy" in (failed[0].get("exception") or ""), failed[0]
    assert {t["state"] for t in seen.values()} <= {"SUCCESS", "FAILURE"}, seen


STOPPED_WORKER = """
import sys
from celery.signals import celeryd_init
from worker import app as celery_app


class Stopped:
    # What celery's WorkController holds once it stopped: EX_FAILURE after an
    # "Unrecoverable error" (as kombu's reconnect race in test_outages causes), EX_OK else.
    exitcode = int(sys.argv[1])


def worker_main(argv):
    celeryd_init.send(sender="stopped@host", instance=Stopped(), conf=None, options={})


celery_app.app.worker_main = worker_main
from worker.cli import main

main(["worker"])
"""


@pytest.mark.parametrize("exitcode", [0, 1])
def test_imagebatch_worker_exits_with_the_status_celery_stopped_with(exitcode: int) -> None:
    """A worker that died on an unrecoverable error must not exit 0, or a supervisor
    restarting only on failure leaves it down (``app.worker_main`` drops the status)."""
    result = subprocess.run(
        [sys.executable, "-c", STOPPED_WORKER, str(exitcode)],
        env=cli_env({"IMAGEBATCH_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == exitcode, result.stdout + result.stderr
