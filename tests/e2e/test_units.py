"""Money in the units providers bill in: credits of one provider are never added to another's,
or to dollars (the defect: a manifest mixing APIFrame credits and Omixa USD reported "est.
24.009 credits"), and a budget is refused when the units it would compare do not add up."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import check_invariants, read_local, run_batch, run_cli


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(latency_s=0.2, sync_latency_s=0.05)) as server:
        yield server


def env(sim: Simulator, **extra: str) -> dict[str, str]:
    return {
        "IMAGEBATCH_APIFRAME_BASE_URL": sim.url_for("apiframe"),
        "IMAGEBATCH_APIFRAME_API_KEY": "afk_units_test_key",
        "IMAGEBATCH_OMIXA_BASE_URL": sim.url_for("omixa"),
        "IMAGEBATCH_OMIXA_API_KEY": "sk-units-test-key",
        "IMAGEBATCH_OMIXA_REQUESTS_PER_SECOND": "50",
        **extra,
    }


def mixed(path: Path) -> Path:
    lines = [
        {"id": "a-1", "prompt": "A red chair", "quality": "low", "size": "1024x1024"},
        {"id": "a-2", "prompt": "A blue chair", "quality": "low", "size": "1024x1024"},
        {
            "id": "o-1",
            "prompt": "A green chair",
            "quality": "low",
            "size": "1024x1024",
            "provider": "omixa",
        },
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_plan_of_a_mixed_manifest_gives_each_unit_its_own_estimate(
    sim: Simulator, tmp_path: Path
) -> None:
    result = run_cli(
        "plan", str(mixed(tmp_path / "m.jsonl")), "--provider", "apiframe", env=env(sim)
    )
    assert result.returncode == 0, result.stderr
    estimate = re.search(r"est\. (.+?) ·", result.stdout)
    assert estimate is not None, result.stdout
    assert estimate.group(1) == "8 apiframe credits + 0.011 USD", result.stdout


def test_a_credit_budget_over_a_mixed_manifest_is_refused_before_anything_is_spent(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.reset()
    result = run_batch(
        mixed(tmp_path / "m.jsonl"),
        "apiframe",
        tmp_path / "out",
        "mixed",
        "--max-credits",
        "10",
        env=env(sim),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "apiframe credits and USD" in result.stderr and "--max-usd" in result.stderr
    assert "Traceback" not in result.stderr
    assert sim.ledger()["submits"] == 0


def test_a_dollar_budget_needs_the_price_of_a_credit(sim: Simulator, tmp_path: Path) -> None:
    sim.reset()
    result = run_batch(
        mixed(tmp_path / "m.jsonl"),
        "apiframe",
        tmp_path / "out",
        "mixed",
        "--max-usd",
        "5",
        env=env(sim),
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "IMAGEBATCH_USD_PER_CREDIT_APIFRAME" in result.stderr
    assert sim.ledger()["submits"] == 0


def test_a_mixed_batch_reports_each_unit_and_a_dollar_total_where_a_credit_has_a_price(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.reset()
    source = mixed(tmp_path / "m.jsonl")
    out = tmp_path / "out"
    result = run_batch(
        source,
        "apiframe",
        out,
        "mixed",
        "--max-usd",
        "5",
        env=env(sim, IMAGEBATCH_USD_PER_CREDIT_APIFRAME="0.01"),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = read_local(out, "mixed")
    check_invariants(source, outcome, sim.ledger())
    summary = outcome.summary
    assert summary["costs"] == {"apiframe credits": 8.0, "USD": 0.011}
    assert summary["credits"] is None and summary["credit_unit"] == "mixed"
    assert summary["usd"] == pytest.approx(0.091)
    assert summary["by_provider"]["apiframe"]["unit"] == "credits"
    assert summary["by_provider"]["omixa"]["unit"] == "USD"
    assert "8 apiframe credits + 0.011 USD" in result.stdout
