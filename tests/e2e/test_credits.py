"""Running out of credits mid-batch (HTTP 402), topping up, and running the same command again."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import check_invariants, read_local, run_cli

pytestmark = pytest.mark.fault

KEY = "afk_credits_test_key_0123456789"
LINES = 12
PER_LINE = 4  # APIFrame credits for one low-quality image
AFFORDABLE = 5


def write_manifest(path: Path) -> None:
    path.write_text(
        "".join(
            json.dumps(
                {
                    "id": f"credit-{k:02d}",
                    "prompt": f"Credits test: a paper lantern, variant {k}",
                    "quality": "low",
                    "size": "1024x1024",
                    "output_format": "png",
                    "metadata": {"k": k},
                }
            )
            + "\n"
            for k in range(LINES)
        )
    )


def test_a_402_mid_run_fails_the_rest_and_the_same_run_after_a_top_up_buys_only_those(
    tmp_path: Path,
) -> None:
    # Given a provider balance that pays for 5 of 12 lines
    manifest = tmp_path / "credits.jsonl"
    write_manifest(manifest)
    out = tmp_path / "out"
    args: tuple[str, ...] = ("run", str(manifest), "--provider", "apiframe", "--out", str(out))
    args += ("--batch-id", "credits")
    with Simulator(SimulatorConfig(latency_s=0.3, credits=AFFORDABLE * PER_LINE)) as sim:
        env = {"IMAGEBATCH_APIFRAME_API_KEY": KEY, "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url}
        # When the batch runs
        first = run_cli(*args, env=env, timeout=60)
        first_ledger = sim.ledger()
        first_outcome = read_local(out, "credits")

        # Then the lines the balance covers succeed, every other line fails with the reason,
        # none is lost, and the run says it stopped
        assert first.returncode == 1, first.stdout + first.stderr
        check_invariants(manifest, first_outcome, first_ledger, idempotent=True)
        statuses = Counter(row.status for row in first_outcome.rows)
        assert statuses == {"succeeded": AFFORDABLE, "failed": LINES - AFFORDABLE}, statuses
        for row in first_outcome.rows:
            if row.status == "failed":
                assert row.error is not None and row.error.type == "insufficient_credits", row
                assert row.error.message and row.credits == 0 and not row.images, row
        summary = first_outcome.summary
        assert summary["stop_reason"] == "insufficient_credits", summary
        assert summary["credits"] == AFFORDABLE * PER_LINE
        assert first_ledger["credits_charged"]["apiframe"] == AFFORDABLE * PER_LINE
        assert first_ledger["submits"] == AFFORDABLE
        first_done = {row.prompt: row for row in first_outcome.rows if row.status == "succeeded"}

        # When the balance is topped up and the very same command runs again
        sim.update(credits=1_000_000.0)
        second = run_cli(*args, env=env, timeout=60)
        ledger = sim.ledger()
        outcome = read_local(out, "credits")

    # Then every line succeeds, and only the lines that had failed were bought
    assert second.returncode == 0, second.stdout + second.stderr
    check_invariants(manifest, outcome, ledger, idempotent=True)
    assert [row.status for row in outcome.rows] == ["succeeded"] * LINES
    assert outcome.summary["stop_reason"] is None, outcome.summary
    assert ledger["submits"] == LINES, ledger["submits"]
    jobs_per_prompt = Counter(job["prompt"] for job in ledger["jobs"])
    assert all(count == 1 for count in jobs_per_prompt.values()), jobs_per_prompt
    for row in outcome.rows:
        if row.prompt in first_done:
            earlier = first_done[row.prompt]
            assert row.job_id == earlier.job_id and row.images == earlier.images, row.id
    assert ledger["credits_charged"]["apiframe"] == LINES * PER_LINE
    # summary.json covers the whole batch: what this run bought plus what was carried over
    assert outcome.summary["credits"] == LINES * PER_LINE, outcome.summary
    assert outcome.summary["succeeded"] == LINES
