"""Paying once: the defects an independent run found where imagebatch bought a line twice,
each run the way a user would meet it (the CLI, the simulator's ledger of what was billed).

    * a CDN that answers 404 once, right after a job finishes, made a line be bought again;
    * running the same command again (after Ctrl-C, or to be sure) bought every line again,
      because the default batch id held a timestamp;
    * an interrupted ``run`` did not say how to resume.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from jobs.simulator import Faults, Simulator, SimulatorConfig
from tests.harness import CLI, check_invariants, cli_env, read_local, run_cli

KEY = "afk_paid_once_test_key_0123456789"


def manifest(path: Path, count: int) -> Path:
    lines = [
        {
            "id": f"mug-{i:03d}",
            "prompt": f"Studio photo of ceramic mug number {i} on a grey background",
            "size": "1024x1024",
            "output_format": "png",
            "quality": "low",
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def env_for(sim: Simulator, **extra: str) -> dict[str, str]:
    return {
        "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
        "IMAGEBATCH_APIFRAME_API_KEY": KEY,
        **extra,
    }


def billed(ledger: dict[str, Any]) -> Counter[str]:
    return Counter(
        job["prompt"] for job in ledger["jobs"] if job["credit_cost"] and job["status"] != "FAILED"
    )


def only_batch(out: Path) -> str:
    (batch,) = [p.name for p in out.iterdir() if p.is_dir()]
    return batch


def test_an_image_that_answers_404_once_after_its_job_finishes_is_not_bought_again(
    tmp_path: Path,
) -> None:
    # Given a CDN that answers 404 to the first GET of every freshly finished image
    source = manifest(tmp_path / "mugs.jsonl", 8)
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=0.3, faults=Faults(cdn_lag=1.0))) as sim:
        # When the batch runs
        result = run_cli(
            "run", str(source), "--provider", "apiframe", "--out", str(out), env=env_for(sim)
        )
        ledger = sim.ledger()
    # Then every line succeeds, each bought exactly once: the 404 was looked at again
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = read_local(out, only_batch(out))
    check_invariants(source, outcome, ledger, idempotent=True)
    assert [row.status for row in outcome.rows] == ["succeeded"] * 8
    assert ledger["submits"] == 8, ledger["submits"]
    assert set(billed(ledger).values()) == {1}
    assert outcome.summary["rebought_after_expiry"] == 0
    assert any(label.endswith(" 404") for label in ledger["requests"]), "no 404 was served"


def test_running_the_same_command_again_buys_nothing_that_is_already_stored(
    tmp_path: Path,
) -> None:
    source = manifest(tmp_path / "mugs.jsonl", 6)
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=0.3)) as sim:
        args = ("run", str(source), "--provider", "apiframe", "--out", str(out))
        # Given a batch that ran to the end, with no --batch-id
        first = run_cli(*args, env=env_for(sim))
        assert first.returncode == 0, first.stdout + first.stderr
        submits = sim.ledger()["submits"]
        # When exactly the same command runs again
        again = run_cli(*args, env=env_for(sim))
        ledger = sim.ledger()
    # Then it is the same batch, nothing is bought again, and it says so
    assert again.returncode == 0, again.stdout + again.stderr
    assert submits == 6 and ledger["submits"] == 6, ledger["submits"]
    batch = only_batch(out)
    assert batch.startswith("mugs-"), batch
    assert "6 lines already stored" in again.stdout, again.stdout
    check_invariants(source, read_local(out, batch), ledger, idempotent=True)


def test_ctrl_c_stops_submitting_prints_the_resume_command_and_that_command_buys_the_rest(
    tmp_path: Path,
) -> None:
    source = manifest(tmp_path / "mugs.jsonl", 30)
    out = tmp_path / "out"
    # An account that takes 3 jobs at a time, 1 s each: the batch takes about 10 s
    config = SimulatorConfig(latency_s=1.0, max_in_flight=3)
    with Simulator(config) as sim:
        env = env_for(sim, IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT="3")
        args = ["run", str(source), "--provider", "apiframe", "--out", str(out)]
        # Given a run under way
        process = subprocess.Popen(
            [*CLI, *args],
            env=cli_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 60
        while sim.ledger()["submits"] < 6 and time.monotonic() < deadline:
            time.sleep(0.1)
        # When the user presses Ctrl-C
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=90)
        interrupted = sim.ledger()
        # Then it stops with 130 and says how to resume
        assert process.returncode == 130, stdout + stderr
        resume = next(line for line in stderr.splitlines() if "resume with:" in line)
        assert "imagebatch run" in resume and str(source) in resume, resume
        assert interrupted["submits"] < 30, "the interrupt came too late to prove anything"
        settled = interrupted["submits"]
        time.sleep(1.5)  # jobs already bought finish at the provider
        assert sim.ledger()["submits"] == settled, "it kept submitting after Ctrl-C"
        # ...and the same command finishes the batch without buying any line twice
        again = run_cli(*args, env=env, timeout=120)
        ledger = sim.ledger()
    assert again.returncode == 0, again.stdout + again.stderr
    outcome = read_local(out, only_batch(out))
    check_invariants(source, outcome, ledger, idempotent=True)
    assert ledger["submits"] == 30, ledger["submits"]
    assert set(billed(ledger).values()) == {1}
