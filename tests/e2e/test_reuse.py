"""Never buying the same image twice, as users meet it (issue 16, items 1 and 9): an edited
manifest, a re-run of failed.jsonl and a second batch under the same ``--out`` take the lines
already bought there (the simulator's ledger shows what was billed); ``--fresh`` buys anyway; a
line is only ever taken for a run that would have bought the very same thing, so the built-in
simulator's placeholders never stand in for a real provider's images."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import CLI, check_invariants, cli_env, read_local, run_cli

KEY = "afk_reuse_test_key_0123456789"


def write(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def mugs(count: int, **edits: str) -> list[dict[str, Any]]:
    return [
        {
            "id": f"mug-{i:02d}",
            "prompt": edits.get(f"mug-{i:02d}", f"Studio photo of ceramic mug number {i}"),
            "quality": "low",
            "metadata": {"sku": str(1000 + i)},
        }
        for i in range(count)
    ]


def env_for(sim: Simulator, **extra: str) -> dict[str, str]:
    return {
        "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
        "IMAGEBATCH_APIFRAME_API_KEY": KEY,
        **extra,
    }


def run(
    source: Path, out: Path, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    return run_cli("run", str(source), "--provider", "apiframe", "--out", str(out), *extra, env=env)


def batches(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_dir()}


def billed(ledger: dict[str, Any]) -> Counter[str]:
    return Counter(
        job["prompt"] for job in ledger["jobs"] if job["credit_cost"] and job["status"] != "FAILED"
    )


def test_editing_one_line_of_a_manifest_buys_that_line_and_takes_the_rest_from_the_first_batch(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=0.2)) as sim:
        env = env_for(sim)
        first = run(write(tmp_path / "mugs.jsonl", mugs(12)), out, env)
        assert first.returncode == 0, first.stdout + first.stderr
        (one,) = batches(out)
        assert sim.ledger()["submits"] == 12
        # Given the manifest with one prompt fixed (same file name, new content)
        edited = write(tmp_path / "mugs.jsonl", mugs(12, **{"mug-05": "A fixed prompt"}))
        # plan says what will be taken and what the rest costs
        plan = run_cli("plan", str(edited), "--provider", "apiframe", "--out", str(out), env=env)
        assert plan.returncode == 0, plan.stdout + plan.stderr
        assert f"11 reused from {out}" in plan.stdout and "est. 4 credits" in plan.stdout, (
            plan.stdout
        )
        # When it runs
        second = run(edited, out, env)
        ledger = sim.ledger()
    # Then one image is bought, the other 11 lines are taken from the first batch
    assert second.returncode == 0, second.stdout + second.stderr
    assert "reusing: 11 lines" in second.stdout, second.stdout
    assert ledger["submits"] == 13, ledger["submits"]
    (two,) = batches(out) - {one}
    outcome = read_local(out, two)
    check_invariants(edited, outcome, ledger, idempotent=True)
    assert set(billed(ledger).values()) == {1}
    earlier = {row.id: row for row in read_local(out, one).rows}
    for row in outcome.rows:
        if row.id == "mug-05":
            assert row.reused_from is None and row.credits == 4 and row.attempts == 1
            continue
        assert row.reused_from is not None, row
        assert (row.reused_from.batch, row.reused_from.line) == (one, row.line)
        assert row.reused_from.job_id == earlier[row.id].job_id
        assert (row.credits, row.attempts, row.job_id) == (0, 0, None)
        assert [i.sha256 for i in row.images] == [i.sha256 for i in earlier[row.id].images]
        assert row.images[0].uri.startswith(f"{out / two}/images/{row.id}/")
        assert row.metadata == earlier[row.id].metadata
    summary = outcome.summary
    assert (summary["succeeded"], summary["reused"], summary["credits"]) == (12, 11, 4)
    assert summary["by_provider"]["apiframe"]["lines"] == 1, "by_provider: what was bought"
    assert summary["jobs_accepted"] == 1


def test_fresh_buys_every_line_again_in_a_batch_of_its_own(tmp_path: Path) -> None:
    source = write(tmp_path / "mugs.jsonl", mugs(4))
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=0.2)) as sim:
        env = env_for(sim)
        assert run(source, out, env).returncode == 0
        plan = run_cli(
            "plan", str(source), "--provider", "apiframe", "--out", str(out), "--fresh", env=env
        )
        assert "reused" not in plan.stdout and "est. 16 credits" in plan.stdout, plan.stdout
        fresh = run(source, out, env, "--fresh")
        ledger = sim.ledger()
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert ledger["submits"] == 8
    assert len(batches(out)) == 2, "--fresh is another batch: the first is left as it was"
    (second,) = [
        b for b in batches(out) if (out / b / "summary.json").exists() and b in fresh.stdout
    ]
    outcome = read_local(out, second)
    assert all(row.reused_from is None and row.credits == 4 for row in outcome.rows)
    assert outcome.summary["reused"] == 0


def test_running_failed_jsonl_buys_only_the_failed_line_and_the_first_batch_then_takes_it(
    tmp_path: Path,
) -> None:
    lines = mugs(5, **{"mug-02": "A mug that fails once [[fail-once]]"})
    source = write(tmp_path / "mugs.jsonl", lines)
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=0.2)) as sim:
        env = env_for(sim, IMAGEBATCH_MAX_ATTEMPTS="1")
        first = run(source, out, env)
        assert first.returncode == 1, first.stdout + first.stderr
        (one,) = batches(out)
        # Given the user runs failed.jsonl as is (another manifest: another batch)
        retried = tmp_path / "failed.jsonl"
        retried.write_bytes((out / one / "failed.jsonl").read_bytes())
        again = run(retried, out, env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert sim.ledger()["submits"] == 6
        # When the original command runs again (it resumes its own batch)
        third = run(source, out, env)
        ledger = sim.ledger()
    # Then the line failed.jsonl bought is taken from there, not bought a third time
    assert third.returncode == 0, third.stdout + third.stderr
    assert ledger["submits"] == 6, ledger["submits"]
    outcome = read_local(out, one)
    check_invariants(source, outcome, ledger, idempotent=True)
    (row,) = [row for row in outcome.rows if row.id == "mug-02"]
    assert row.reused_from is not None and row.reused_from.batch != one
    assert outcome.summary["reused"] == 1 and outcome.summary["succeeded"] == 5


def test_the_simulators_placeholders_never_resume_a_run_on_a_real_provider(
    tmp_path: Path,
) -> None:
    source = write(tmp_path / "mugs.jsonl", mugs(3))
    out = tmp_path / "out"
    # Given the manifest was tried out on the built-in simulator
    tried = run_cli("run", str(source), "--provider", "simulator", "--out", str(out))
    assert tried.returncode == 0, tried.stdout + tried.stderr
    (placeholders,) = batches(out)
    with Simulator(SimulatorConfig(latency_s=0.2)) as real:  # standing in for APIFrame
        env = env_for(real)
        # An explicit --batch-id of that batch with another provider is refused
        refused = run(source, out, env, "--batch-id", placeholders)
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert refused.stderr.strip() == (
            f"error: batch {placeholders} under {out / placeholders} was started with "
            "--provider simulator, not apiframe: pass --provider simulator to resume it, or "
            "choose another --batch-id"
        )
        assert real.ledger()["submits"] == 0
        # When the same command runs on the real provider
        bought = run(source, out, env)
        ledger = real.ledger()
    # Then it is another batch, and every line is bought there
    assert bought.returncode == 0, bought.stdout + bought.stderr
    assert "already stored" not in bought.stdout and "reusing" not in bought.stdout
    assert ledger["submits"] == 3
    (real_batch,) = batches(out) - {placeholders}
    outcome = read_local(out, real_batch)
    check_invariants(source, outcome, ledger, idempotent=True)
    assert {row.provider for row in outcome.rows} == {"apiframe"}
    assert all(row.reused_from is None for row in outcome.rows)


def test_two_batches_running_at_once_under_one_out_each_end_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    a = write(tmp_path / "a.jsonl", mugs(8))
    b = write(tmp_path / "b.jsonl", mugs(8, **{"mug-07": "Another mug"}))
    with Simulator(SimulatorConfig(latency_s=0.5)) as sim:
        env = cli_env(env_for(sim))
        args = ["--provider", "apiframe", "--out", str(out)]
        # Given the first is already buying when the second starts
        running = subprocess.Popen(
            [*CLI, "run", str(a), *args], env=env, stdout=subprocess.PIPE, text=True
        )
        second = run(b, out, env_for(sim))
        running.communicate(timeout=120)
        ledger = sim.ledger()
    # Then both end with every line stored, each row's images its own batch's
    assert running.returncode == 0 and second.returncode == 0, second.stdout + second.stderr
    for source, name in ((a, "a-"), (b, "b-")):
        (batch,) = [p for p in batches(out) if p.startswith(name)]
        outcome = read_local(out, batch)
        check_invariants(source, outcome, ledger=None)
        assert outcome.summary["succeeded"] == 8
    # ...and nothing was bought more than once per batch (what one had stored, the other took)
    assert ledger["submits"] <= 16
    assert max(billed(ledger).values()) <= 2
