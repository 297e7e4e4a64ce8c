"""Issue 5's promises end to end: the catalog runs through each of the five providers, a
budget stops spending before it is exceeded, and slow synchronous calls starve nothing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from jobs.output.rows import ResultRow
from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import CATALOG, check_invariants, read_local, run_batch, run_cli

PROVIDERS = ["apiframe", "openai", "aimlapi", "omixa", "oxen"]
KEYS = {p: ("afk_" if p == "apiframe" else "sk-") + "e2e-test-key" for p in PROVIDERS}


@pytest.fixture(scope="module")
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(latency_s=0.3, sync_latency_s=0.1)) as server:
        yield server


def provider_env(sim: Simulator, *providers: str, **extra: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for p in providers:
        env[f"IMAGEBATCH_{p.upper()}_BASE_URL"] = sim.url_for(p)
        env[f"IMAGEBATCH_{p.upper()}_API_KEY"] = KEYS[p]
        env[f"IMAGEBATCH_{p.upper()}_REQUESTS_PER_SECOND"] = "100"
    return {**env, **extra}


def common(row: ResultRow) -> dict[str, Any]:
    """What must not depend on the provider."""
    images = [(i.width, i.height, i.content_type) for i in row.images]
    return {
        "line": row.line,
        "id": row.id,
        "status": row.status,
        "prompt": row.prompt,
        "model": row.model,
        "metadata": row.metadata,
        "images": images,
        "error": row.error,
    }


def test_the_catalog_gives_the_same_rows_through_every_provider(
    sim: Simulator, tmp_path: Path
) -> None:
    rows: dict[str, list[ResultRow]] = {}
    for provider in PROVIDERS:
        sim.reset()
        out = tmp_path / provider
        result = run_batch(
            CATALOG,
            provider,
            str(out),
            "catalog",
            env=provider_env(sim, provider),
        )
        assert result.returncode == 0, f"{provider}: {result.stdout}{result.stderr}"
        outcome = read_local(out, "catalog")
        check_invariants(CATALOG, outcome, sim.ledger(), idempotent=provider == "apiframe")
        rows[provider] = outcome.rows
        assert {row.provider for row in outcome.rows} == {provider}
        charged = sum(sim.ledger()["credits_charged"].values())
        assert outcome.summary["credits"] == pytest.approx(charged)
    reference = [common(row) for row in rows["apiframe"]]
    for provider in PROVIDERS[1:]:
        assert [common(row) for row in rows[provider]] == reference, provider


def test_plan_prices_each_provider_in_its_own_unit(sim: Simulator) -> None:
    for provider, unit in [("apiframe", "credits"), ("openai", "USD"), ("omixa", "USD")]:
        result = run_cli("plan", CATALOG, "--provider", provider)
        assert result.returncode == 0, result.stderr
        assert f" {unit} · " in result.stdout


def test_max_credits_stops_submitting_at_the_budget_and_a_rerun_finishes_the_rest(
    sim: Simulator, tmp_path: Path
) -> None:
    sim.reset()
    env = provider_env(sim, "apiframe")
    first = run_batch(
        CATALOG,
        "apiframe",
        str(tmp_path),
        "budget",
        "--max-credits",
        "200",
        env=env,
    )
    assert first.returncode == 1, first.stdout + first.stderr
    outcome = read_local(tmp_path, "budget")
    check_invariants(CATALOG, outcome, sim.ledger())
    assert outcome.summary["credits"] <= 200
    spent = {row.id for row in outcome.rows if row.status == "succeeded"}
    assert spent and len(spent) < 20
    for row in outcome.rows:
        if row.status == "failed":
            assert row.error is not None and row.error.type == "budget"
            assert row.credits == 0
    billed_first = sim.ledger()["submits"]

    again = run_batch(
        CATALOG,
        "apiframe",
        str(tmp_path),
        "budget",
        env=env,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    outcome = read_local(tmp_path, "budget")
    check_invariants(CATALOG, outcome, sim.ledger())
    assert all(row.status == "succeeded" for row in outcome.rows)
    assert sim.ledger()["submits"] == billed_first + 20 - len(spent)
    assert outcome.summary["credits"] == 552


def test_slow_synchronous_calls_do_not_stop_async_lines_from_finishing(tmp_path: Path) -> None:
    lines = [
        {
            "id": f"sync-{i}",
            "prompt": f"slow sync image {i}",
            "provider": "openai",
            "size": "1024x1024",
            "output_format": "png",
        }
        for i in range(6)
    ]
    lines += [
        {
            "id": f"async-{i}",
            "prompt": f"fast async image {i}",
            "size": "1024x1024",
            "output_format": "png",
        }
        for i in range(8)
    ]
    manifest = tmp_path / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with Simulator(SimulatorConfig(latency_s=0.3, sync_latency_s=3.0)) as slow:
        env = provider_env(
            slow,
            "apiframe",
            "openai",
            IMAGEBATCH_WORKER_CONCURRENCY="4",
            IMAGEBATCH_OPENAI_MAX_IN_FLIGHT="2",
        )
        result = run_batch(
            manifest,
            "apiframe",
            str(tmp_path / "out"),
            "mixed",
            env=env,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    rows = read_local(tmp_path / "out", "mixed").rows

    def done(prefix: str) -> list[datetime]:
        return [
            datetime.fromisoformat(row.completed_at or "")
            for row in rows
            if (row.id or "").startswith(prefix)
        ]

    # Six 3-second calls, two at a time, take at least 9 s; the async lines need about 1 s.
    assert (max(done("sync")) - max(done("async"))).total_seconds() >= 4


def test_oxen_takes_quality_background_and_input_fidelity_as_its_model_page_says(
    sim: Simulator, tmp_path: Path
) -> None:
    """The defect: Oxen rejected every line with ``quality``. Its GPT Image 1.5 page names
    quality, input fidelity and background; the adapter reads the model's request schema."""
    source = tmp_path / "oxen.jsonl"
    line = {
        "id": "oxen-hq",
        "prompt": "A porcelain teapot, studio light",
        "quality": "high",
        "background": "opaque",
        "size": "1536x1024",
        "output_format": "png",
    }
    source.write_text(json.dumps(line) + "\n")
    env = provider_env(sim, "oxen")
    plan = run_cli("plan", str(source), "--provider", "oxen", env=env)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    assert "1 valid · 0 rejected" in plan.stdout, plan.stdout
    sim.reset()
    out = tmp_path / "out"
    result = run_batch(source, "oxen", out, "oxen-hq", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    outcome = read_local(out, "oxen-hq")
    check_invariants(source, outcome, sim.ledger(), idempotent=False)
    (row,) = outcome.rows
    assert row.status == "succeeded" and (row.images[0].width, row.images[0].height) == (1536, 1024)
    sent = next(job for job in sim.ledger()["jobs"] if job["provider"] == "oxen")
    assert sent["images"] == 1
