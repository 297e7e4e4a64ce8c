"""Only the process that runs a batch may interrupt it. The defect: ``imagebatch run
--batch-id ds1`` (or ``retry ds1``) on a batch a fleet was running attached to it, and its
Ctrl-C marked the fleet's batch ``interrupted``: the fleet stopped buying for it and a
``status --watch --exit-status`` elsewhere exited 1."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path
from typing import Any

import redis

from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import (
    CLI,
    check_invariants,
    cli_env,
    read_local,
    run_cli,
    start_worker,
    stop,
    wait_for,
)
from worker.redis import keys

KEY = "afk_ownership_test_key"
LINES = 16


def write_manifest(path: Path) -> Path:
    lines = [{"id": f"kite-{k}", "prompt": f"a paper kite, variant {k}"} for k in range(LINES)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_ctrl_c_of_a_run_that_attached_to_a_fleets_batch_only_stops_following_it(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    manifest = write_manifest(tmp_path / "kites.jsonl")
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=1.0)) as sim:
        env = {
            "IMAGEBATCH_BROKER_URL": redis_url,
            "IMAGEBATCH_APIFRAME_API_KEY": KEY,
            "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
            "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": "2",
            "IMAGEBATCH_OUT": str(out),
        }
        # Given a batch a fleet runs, and someone watching it until it ends
        args = ["--provider", "apiframe", "--batch-id", "ds1"]
        submitted = run_cli("submit", str(manifest), *args, env=env)
        assert submitted.returncode == 0, submitted.stderr
        worker = start_worker(env, "fleet", tmp_path / "worker.log", concurrency=2)
        watcher = subprocess.Popen(
            [*CLI, "status", "ds1", "--watch", "--exit-status"],
            env=cli_env(env),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # When a run on another machine attaches to it, and is Ctrl-C'd
            log = tmp_path / "attached.log"
            with open(log, "wb") as handle:
                attached = subprocess.Popen(
                    [*CLI, "run", str(manifest), *args],
                    env=cli_env(env),
                    stdout=handle,
                    stderr=subprocess.STDOUT,
                )
            wait_for(lambda: "following it" in log.read_text(), 30, "the run to attach")
            attached.send_signal(signal.SIGINT)
            code = attached.wait(30)
            said = log.read_text()
            status_after = redis_client.hget(keys.batch("ds1"), "status")
            # ... and a retry of it is asked for while it runs
            retried = run_cli("retry", "ds1", env=env)
            # Then the batch goes on to the end, every line bought once
            wait_for(
                lambda: redis_client.hget(keys.batch("ds1"), "summary"),
                90,
                "the batch to finish",
                interval=0.3,
            )
            watched = watcher.wait(30)
        finally:
            stop(watcher)
            stop(worker)
        ledger = sim.ledger()
    # ... the attached run only stopped following it, and said so
    assert code == 130, said
    assert status_after == b"running", (status_after, said)
    assert "stopped following batch ds1; it goes on" in said, said
    assert "resume with" not in said, said
    # ... the retry was refused, with the batch's status
    assert retried.returncode == 2, retried.stdout + retried.stderr
    assert "batch ds1 is running (ds1: running ·" in retried.stderr, retried.stderr
    # ... and the watcher saw it succeed
    assert watched == 0
    outcome = read_local(out, "ds1")
    check_invariants(manifest, outcome, ledger, redis_client)
    assert all(row.status == "succeeded" for row in outcome.rows)
    assert ledger["submits"] == LINES
