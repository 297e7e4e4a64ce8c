"""``plan`` and ``run`` check a manifest the same way (issue 16, item 4): a line whose own
provider ``run`` could not reach (no key, unknown) is rejected by both, with the same reason,
and both print their rejections in line order."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.harness import check_invariants, read_local, run_cli

LINES = [
    {"id": "ok-1", "prompt": "a red bicycle", "quality": "low"},
    {"id": "openai", "prompt": "a blue kettle", "provider": "openai"},
    {"id": "typo", "prompt": "a green chair", "qualty": "high"},
    {"id": "oxen", "prompt": "a lamp", "provider": "oxen"},
    {"id": "bad-size", "prompt": "a door", "size": "1000x1000"},
    {"id": "nope", "prompt": "a cup", "provider": "nope"},
    {"id": "ok-2", "prompt": "a yellow umbrella", "quality": "low"},
]


def rejections(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": rejected: " in line]


def test_plan_rejects_and_prices_exactly_what_run_does_and_both_print_in_line_order(
    tmp_path: Path,
) -> None:
    source = tmp_path / "mixed.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in LINES))
    out = tmp_path / "out"
    env = {"IMAGEBATCH_OUT": str(out)}
    plan = run_cli("plan", str(source), "--provider", "simulator", env=env)
    run = run_cli("run", str(source), "--provider", "simulator", env=env)
    assert plan.returncode == 1 and run.returncode == 1, plan.stderr + run.stderr
    planned, ran = rejections(plan.stderr), rejections(run.stderr)
    assert planned == ran, (planned, ran)
    numbers = [int(line.split(":")[1]) for line in ran]
    assert numbers == [2, 3, 4, 5, 6], ran
    assert f"{source}:2: rejected: no provider key: set IMAGEBATCH_OPENAI_API_KEY" in ran[0]
    assert "7 lines · 2 valid · 5 rejected · 2 images · est. 8 credits" in plan.stdout, plan.stdout
    assert re.search(r"7 lines \(2 valid, 5 rejected\) .* est\. 8 credits", run.stdout), run.stdout
    (batch,) = [p.name for p in out.iterdir() if p.is_dir()]
    outcome = read_local(out, batch)
    check_invariants(source, outcome)
    assert [row.status for row in outcome.rows].count("rejected") == 5


def test_plan_prices_the_batchs_provider_before_its_key_is_set_and_says_run_needs_it(
    tmp_path: Path,
) -> None:
    source = tmp_path / "two.jsonl"
    source.write_text("".join(json.dumps(line) + "\n" for line in (LINES[0], LINES[6])))
    env = {"IMAGEBATCH_OUT": str(tmp_path / "out")}
    plan = run_cli("plan", str(source), "--provider", "apiframe", env=env)
    run = run_cli("run", str(source), "--provider", "apiframe", env=env)
    assert plan.returncode == 0 and "2 valid · 0 rejected" in plan.stdout, plan.stdout
    refusal = "no provider key: set IMAGEBATCH_APIFRAME_API_KEY"
    assert f"note: run will refuse to start: {refusal}" in plan.stderr, plan.stderr
    assert run.returncode == 2 and refusal in run.stderr, run.stderr
