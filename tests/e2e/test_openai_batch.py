"""Issue 18 end to end: ``imagebatch run --provider openai-batch`` against the simulator's
Batch API, as users run it (the CLI, the embedded Redis and worker): half the price, matching
the simulator's ledger; refusals failing their lines alone; an expired batch finished by a
later one; a lost create found by its metadata; Ctrl-C leaving the OpenAI batch running for
the same command to pick up."""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from jobs.simulator import BatchConfig, Simulator, SimulatorConfig
from tests.harness import CLI, check_invariants, cli_env, read_local, run_batch, run_cli, wait_for

FAST = BatchConfig(request_latency_s=0.05, concurrency=8, validating_s=0.1, finalizing_s=0.1)


@pytest.fixture(scope="module")
def _sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(sync_latency_s=0, image_mode="tiny", batch=FAST)) as sim:
        yield sim


@pytest.fixture
def sim(_sim: Simulator) -> Iterator[Simulator]:
    _sim.reset()
    yield _sim
    _sim.update(batch=FAST)


def batch_env(sim: Simulator, **extra: str) -> dict[str, str]:
    """The OpenAI key and base URL only: openai-batch uses them (same account)."""
    return {
        "IMAGEBATCH_OPENAI_API_KEY": "sk-e2e-test-key",
        "IMAGEBATCH_OPENAI_BASE_URL": sim.url_for("openai"),
        "IMAGEBATCH_OPENAI_BATCH_POLL_S": "0.3",
        "IMAGEBATCH_OPENAI_BATCH_GROUP_SIZE": "8",
        "IMAGEBATCH_PROGRESS_INTERVAL_S": "0.5",
        **extra,
    }


def manifest(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def kettles(count: int, **fields: Any) -> list[dict[str, Any]]:
    return [
        {"id": f"k{i:03d}", "prompt": f"a copper kettle, view {i}", **fields} for i in range(count)
    ]


def bought(sim: Simulator) -> Counter[str]:
    """Billed requests per manifest line id (custom_id ``idx:attempt:id``)."""
    return Counter(
        r["custom_id"].split(":", 2)[2]
        for r in sim.ledger()["openai_batch_requests"]
        if r["billed"]
    )


def est_usd(text: str) -> float:
    match = re.search(r"est\. ([0-9.]+) USD", text)
    assert match, text
    return float(match.group(1))


def test_plan_and_summary_are_half_the_synchronous_price_and_match_the_ledger(
    sim: Simulator, tmp_path: Path
) -> None:
    # Given a manifest of every quality at each standard size, n of 1 to 3
    lines = []
    for i, (quality, size) in enumerate(
        (q, s)
        for q in ("low", "medium", "high", "auto")
        for s in ("1024x1024", "1536x1024", "1024x1536")
    ):
        lines.append(
            {
                "id": f"l{i}",
                "prompt": f"a teapot {i}",
                "quality": quality,
                "size": size,
                "n": 1 + i % 3,
            }
        )
    source = manifest(tmp_path / "teapots.jsonl", lines)
    env = batch_env(sim)
    sim.update(batch={"concurrency": 2, "request_latency_s": 0.4})  # ~2 s: progress sees it run

    # When it is planned for both OpenAI providers, then run through the Batch API
    half = run_cli("plan", str(source), "--provider", "openai-batch", env=env)
    full = run_cli("plan", str(source), "--provider", "openai", env=env)
    out = tmp_path / "out"
    done = run_batch(source, "openai-batch", out, "teapots", env=env)

    # Then plan says half the price and within 24 h...
    assert half.returncode == full.returncode == 0, half.stderr + full.stderr
    assert est_usd(half.stdout) == pytest.approx(est_usd(full.stdout) / 2)
    assert "at half the price of openai" in half.stdout and "finishes within 24 h" in half.stdout
    assert "est. within 24 h" in half.stdout
    # ...and the run cost exactly that: the rows, the summary and the simulator's ledger agree
    assert done.returncode == 0, done.stdout + done.stderr
    outcome = read_local(out, "teapots")
    check_invariants(source, outcome)
    ledger = sim.ledger()
    assert outcome.summary["credits"] == pytest.approx(est_usd(half.stdout))
    assert outcome.summary["credits"] == pytest.approx(ledger["credits_charged"]["openai-batch"])
    assert outcome.summary["costs"] == {"USD": pytest.approx(outcome.summary["credits"])}
    assert outcome.summary["openai_batches"] == len(ledger["openai_batches"]) == 2
    assert outcome.summary["openai_batches_refused"] == 0
    assert set(bought(sim).values()) == {1}
    assert {row.provider for row in outcome.rows} == {"openai-batch"}
    assert "2 OpenAI batches" in (out / "teapots" / "report.html").read_text()
    # the progress showed each OpenAI batch's state and request counts
    shown = r"openai-batch batch_\w+: in_progress \(requests: \d+ completed, 0 failed of 8\)"
    assert re.search(shown, done.stdout), done.stdout


def test_a_per_request_400_and_a_content_refusal_fail_with_the_reason_the_rest_succeed(
    sim: Simulator, tmp_path: Path
) -> None:
    lines = kettles(6, quality="low")
    lines[1]["prompt"] += " [[policy]]"
    lines[4]["provider_params"] = {"style": "vivid"}  # a field the endpoint refuses
    source = manifest(tmp_path / "kettles.jsonl", lines)
    out = tmp_path / "out"

    done = run_batch(source, "openai-batch", out, "refusals", env=batch_env(sim))

    assert done.returncode == 1, done.stdout + done.stderr
    outcome = read_local(out, "refusals")
    check_invariants(source, outcome)
    by_id = {row.id: row for row in outcome.rows}
    assert [by_id[f"k{i:03d}"].status for i in range(6)] == [
        "succeeded", "failed", "succeeded", "succeeded", "failed", "succeeded"
    ]  # fmt: skip
    policy, field = by_id["k001"].error, by_id["k004"].error
    assert policy is not None and policy.type == "content_policy"
    assert "safety system" in policy.message and not policy.retryable
    assert field is not None and field.type == "provider_rejected" and "style" in field.message
    assert bought(sim) == Counter({f"k{i:03d}": 1 for i in (0, 2, 3, 5)})
    assert len(sim.ledger()["openai_batches"]) == 1


def test_an_expired_batch_s_unfinished_lines_finish_in_a_later_one_and_none_is_bought_twice(
    sim: Simulator, tmp_path: Path
) -> None:
    # Given batches that run two requests at a time, 0.4 s each, and expire after 1 s: a batch
    # of eight finishes four; one of four finishes
    sim.update(
        batch={
            "concurrency": 2,
            "request_latency_s": 0.4,
            "window_s": 1.0,
            "validating_s": 0.05,
            "finalizing_s": 0.05,
        }
    )
    source = manifest(tmp_path / "kettles.jsonl", kettles(8, quality="low"))
    out = tmp_path / "out"

    done = run_batch(source, "openai-batch", out, "expiry", env=batch_env(sim))

    assert done.returncode == 0, done.stdout + done.stderr
    outcome = read_local(out, "expiry")
    check_invariants(source, outcome)
    ledger = sim.ledger()
    assert [b["status"] for b in ledger["openai_batches"]] == ["expired", "completed"]
    first, second = (b["id"] for b in ledger["openai_batches"])
    by_batch: dict[str, set[str]] = {first: set(), second: set()}
    for request in ledger["openai_batch_requests"]:
        if request["billed"]:
            by_batch[request["batch"]].add(request["custom_id"].split(":", 2)[2])
    # the expired batch's finished lines were bought there and only there
    assert len(by_batch[first]) == 4 and len(by_batch[second]) == 4
    assert not by_batch[first] & by_batch[second]
    assert set(bought(sim).values()) == {1}
    attempts = {row.id: row.attempts for row in outcome.rows}
    assert sorted(attempts.values()) == [1, 1, 1, 1, 2, 2, 2, 2]
    assert all(attempts[line] == 2 for line in by_batch[second])


def test_a_create_whose_answer_is_lost_is_found_by_its_metadata_one_batch_not_two(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.update(batch={"create_drops": 1})
    source = manifest(tmp_path / "kettles.jsonl", kettles(5, quality="low"))
    out = tmp_path / "out"

    done = run_batch(source, "openai-batch", out, "lost-create", env=batch_env(sim))

    assert done.returncode == 0, done.stdout + done.stderr
    outcome = read_local(out, "lost-create")
    check_invariants(source, outcome)
    ledger = sim.ledger()
    assert ledger["requests"].get("POST /openai/v1/batches dropped") == 1, ledger["requests"]
    assert len(ledger["openai_batches"]) == 1
    assert outcome.summary["openai_batches"] == 1
    assert set(bought(sim).values()) == {1} and len(bought(sim)) == 5


def test_ctrl_c_leaves_the_openai_batch_running_and_the_same_command_picks_it_up(
    sim: Simulator, tmp_path: Path
) -> None:
    # Given a batch the simulator takes about four seconds to run
    sim.update(batch={"concurrency": 1, "request_latency_s": 0.6})
    source = manifest(tmp_path / "kettles.jsonl", kettles(6, quality="low"))
    out = tmp_path / "out"
    env = batch_env(sim)
    args = ["run", str(source), "--provider", "openai-batch", "--out", str(out)]
    args += ["--batch-id", "interrupted"]
    process = subprocess.Popen(
        [*CLI, *args], env=cli_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # When Ctrl-C comes while the OpenAI batch is in progress
        def running() -> bool:
            found = sim.ledger()["openai_batches"]
            return bool(found) and found[0]["status"] == "in_progress"

        wait_for(running, 60, "the OpenAI batch to run")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    # Then the run stops at once with the command that resumes it, and the batch runs on
    assert process.returncode == 130, stdout + stderr
    (job,) = sim.ledger()["openai_batches"]
    assert job["status"] in ("in_progress", "finalizing"), job
    assert f"still running at the provider, paid as they finish: {job['id']}" in stderr, stderr
    status = run_cli("status", "interrupted", "--out", str(out), env=env)
    assert re.search(rf"openai-batch {job['id']}: \w+", status.stdout), status.stdout
    # ...and the same command picks it up: the batch's results, nothing bought again
    again = run_cli(*args, env=env, timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming: 6 lines are in provider jobs already running" in again.stdout, again.stdout
    outcome = read_local(out, "interrupted")
    check_invariants(source, outcome)
    assert [b["id"] for b in sim.ledger()["openai_batches"]] == [job["id"]]
    assert set(bought(sim).values()) == {1} and len(bought(sim)) == 6
    assert outcome.summary["openai_batches"] == 1
    assert all(row.job_id and row.job_id.startswith("batch_req_") for row in outcome.rows)


def test_plan_says_a_model_s_price_is_unknown_rather_than_guess(
    sim: Simulator, tmp_path: Path
) -> None:
    lines = [
        {"prompt": "a wide teapot", "model": "gpt-image-2", "size": "2048x1152"},
        {"prompt": "a teapot", "model": "gpt-image-1-mini", "quality": "low"},
    ]
    source = manifest(tmp_path / "models.jsonl", lines)

    plan = run_cli("plan", str(source), "--provider", "openai-batch", env=batch_env(sim))

    assert plan.returncode == 0, plan.stderr
    assert "price unknown: 1 line of gpt-image-2" in plan.stdout, plan.stdout
    assert est_usd(plan.stdout) == pytest.approx(0.0025)


def test_with_the_fallback_a_line_a_batch_left_unfinished_is_bought_synchronously_at_full_price(
    sim: Simulator, tmp_path: Path
) -> None:
    lines = kettles(4, quality="low")
    lines[2]["prompt"] += " [[fail-once]]"  # its batch request fails with a 500
    source = manifest(tmp_path / "kettles.jsonl", lines)
    out = tmp_path / "out"
    env = batch_env(sim, IMAGEBATCH_OPENAI_BATCH_FALLBACK="true")

    done = run_batch(source, "openai-batch", out, "fallback", env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    outcome = read_local(out, "fallback")
    check_invariants(source, outcome)
    by_id = {row.id: row for row in outcome.rows}
    assert by_id["k002"].provider == "openai" and by_id["k002"].attempts == 2
    assert by_id["k002"].credits == pytest.approx(0.009)  # the synchronous, full price
    assert {by_id[f"k00{i}"].provider for i in (0, 1, 3)} == {"openai-batch"}
    charged = sim.ledger()["credits_charged"]
    assert charged == {"openai-batch": pytest.approx(3 * 0.0045), "openai": pytest.approx(0.009)}
    assert outcome.summary["by_provider"]["openai"]["lines"] == 1
    assert outcome.summary["costs"] == {"USD": pytest.approx(3 * 0.0045 + 0.009)}
