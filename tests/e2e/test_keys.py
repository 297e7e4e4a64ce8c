"""A wrong API key is found before anything is spent. The defect:
``IMAGEBATCH_APIFRAME_API_KEY=badkey imagebatch run …`` sent 20 paid POSTs, all 401, and
ended with 20 warnings, 20 failed rows and exit 1. Where the provider has a free call that
checks a key (APIFrame ``GET /v2/me``, OpenAI ``GET /v1/models``), ``run`` asks it first and
exits 2 naming the setting; where it has none, the first 401 stops the batch before another
line is sent."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import read_local, run_batch


def write_manifest(path: Path, count: int) -> Path:
    lines = [{"id": f"jar-{k}", "prompt": f"a glass jar, variant {k}"} for k in range(count)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def posts(ledger: dict[str, Any]) -> int:
    return sum(n for route, n in ledger["requests"].items() if route.startswith("POST "))


@pytest.mark.parametrize(
    ("provider", "key", "check"),
    [
        ("apiframe", "badkey", "GET /v2/me 401"),
        ("openai", "invalid-openai-key-0123", "GET /openai/v1/models 401"),
    ],
)
def test_a_refused_key_exits_2_naming_the_setting_before_a_paid_call(
    tmp_path: Path, provider: str, key: str, check: str
) -> None:
    manifest = write_manifest(tmp_path / "jars.jsonl", 20)
    with Simulator(SimulatorConfig(latency_s=0.2)) as sim:
        setting = f"IMAGEBATCH_{provider.upper()}_API_KEY"
        env = {setting: key, f"IMAGEBATCH_{provider.upper()}_BASE_URL": sim.url_for(provider)}
        # When a run starts with a key the provider refuses
        result = run_batch(manifest, provider, tmp_path / "out", "jars", env=env, timeout=60)
        ledger = sim.ledger()
    # Then it exits 2 with one line naming the setting, the key itself nowhere
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert setting in result.stderr and key not in result.stdout + result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    # ... having asked the free call, and bought (or even sent) nothing
    assert ledger["requests"].get(check) == 1, ledger["requests"]
    assert posts(ledger) == 0 and ledger["submits"] == 0, ledger["requests"]


def test_a_good_key_passes_the_check_and_the_run_buys_as_usual(tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path / "jars.jsonl", 2)
    with Simulator(SimulatorConfig(latency_s=0.2)) as sim:
        env = {
            "IMAGEBATCH_OPENAI_API_KEY": "sk-good-key-0123",
            "IMAGEBATCH_OPENAI_BASE_URL": sim.url_for("openai"),
        }
        result = run_batch(manifest, "openai", tmp_path / "out", "jars", env=env, timeout=60)
        ledger = sim.ledger()
    assert result.returncode == 0, result.stdout + result.stderr
    # The run's check before it starts, and the worker's before its first paid submit (so no
    # submit waits on another to prove the key)
    assert ledger["requests"].get("GET /openai/v1/models 200") == 2, ledger["requests"]
    assert posts(ledger) == 2


def test_without_a_free_check_the_first_401_stops_the_batch_before_another_line_is_sent(
    tmp_path: Path,
) -> None:
    manifest = write_manifest(tmp_path / "jars.jsonl", 12)
    with Simulator(SimulatorConfig(latency_s=0.2)) as sim:
        env = {
            "IMAGEBATCH_OMIXA_API_KEY": "invalid-omixa-key-0123",
            "IMAGEBATCH_OMIXA_BASE_URL": sim.url_for("omixa"),
            # room for a burst: every line could be sent at once
            "IMAGEBATCH_OMIXA_MAX_IN_FLIGHT": "12",
            "IMAGEBATCH_OMIXA_REQUESTS_PER_SECOND": "100",
        }
        result = run_batch(manifest, "omixa", tmp_path / "out", "jars", env=env, timeout=60)
        ledger = sim.ledger()
    # Then one POST found the key refused, and no other line was sent
    assert posts(ledger) == 1, ledger["requests"]
    assert result.returncode == 1, result.stdout + result.stderr
    rows = read_local(tmp_path / "out", "jars").rows
    assert all(row.status == "failed" and row.error and row.error.type == "auth" for row in rows)
    assert "IMAGEBATCH_OMIXA_API_KEY" in result.stdout + result.stderr
