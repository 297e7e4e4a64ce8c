"""What a resumed batch's summary says it bought and how long it took (issue 16, item 3): the
counters of an interrupted run add up with the run that finishes the batch, and a ``retry`` with
nothing to retry changes neither the counters nor the batch's times."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import CLI, check_invariants, cli_env, read_local, run_cli

KEY = "afk_resumed_summary_key_0123456789"


def manifest(path: Path, count: int) -> Path:
    lines = [
        {"id": f"bowl-{i:02d}", "prompt": f"a ceramic bowl number {i}", "quality": "low"}
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def polls_seen(ledger: dict[str, Any]) -> int:
    return sum(n for label, n in ledger["requests"].items() if label.startswith("GET /v2/jobs/"))


def took_s(report: str) -> int:
    found = re.search(r"took (\d+):(\d\d):(\d\d)", report)
    assert found, "no 'took' in report.html"
    hours, minutes, seconds = (int(part) for part in found.groups())
    return hours * 3600 + minutes * 60 + seconds


def test_an_interrupted_runs_jobs_and_time_count_in_the_summary_of_the_run_that_ends_it(
    tmp_path: Path,
) -> None:
    source = manifest(tmp_path / "bowls.jsonl", 24)
    out = tmp_path / "out"
    config = SimulatorConfig(latency_s=1.0, max_in_flight=3)
    with Simulator(config) as sim:
        env = {
            "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
            "IMAGEBATCH_APIFRAME_API_KEY": KEY,
            "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": "3",
        }
        args = ["run", str(source), "--provider", "apiframe", "--out", str(out)]
        # Given a run interrupted (Ctrl-C) once a third of the lines were bought
        started = time.monotonic()
        process = subprocess.Popen(
            [*CLI, *args], env=cli_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 60
        while sim.ledger()["submits"] < 8 and time.monotonic() < deadline:
            time.sleep(0.1)
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=90)
        first_s = time.monotonic() - started
        assert process.returncode == 130
        bought_first = sim.ledger()["submits"]
        assert 8 <= bought_first < 24
        # ...and resumed a while later
        time.sleep(3)
        started = time.monotonic()
        again = run_cli(*args, env=env, timeout=120)
        second_s = time.monotonic() - started
        assert again.returncode == 0, again.stdout + again.stderr
        (batch,) = [p.name for p in out.iterdir() if p.is_dir()]
        ledger = sim.ledger()
        outcome = read_local(out, batch)
        # When there is nothing to retry, but the user retries anyway
        time.sleep(2)
        retried = run_cli("retry", batch, "--out", str(out), env=env)
        assert retried.returncode == 0, retried.stdout + retried.stderr
        after = read_local(out, batch)
    check_invariants(source, outcome, ledger, idempotent=True)
    summary = outcome.summary
    # Then the summary counts every job the batch paid for, over both runs
    assert ledger["submits"] == 24 and summary["runs"] == 2
    assert summary["jobs_accepted"] == ledger["submits"] + ledger["replays"], summary
    assert summary["submit_requests"] == ledger["submits"] + ledger["replays"], summary
    assert summary["polls"] == polls_seen(ledger), (summary["polls"], polls_seen(ledger))
    # ...and the time it took is its runs' time, not the pause between them
    assert summary["elapsed_s"] <= first_s + second_s
    assert summary["elapsed_s"] >= 24 / 3 * 1.0 * 0.9, "the provider's bound: 8 rounds of 1 s"
    report = (out / batch / "report.html").read_text()
    assert abs(took_s(report) - summary["elapsed_s"]) <= 1
    # ...and a retry with nothing to do changes neither the counts nor the batch's times
    for name in ("jobs_accepted", "submit_requests", "polls", "finished_at", "elapsed_s"):
        assert after.summary[name] == summary[name], name
    assert after.summary["runs"] == 3
    assert took_s((out / batch / "report.html").read_text()) == took_s(report)
