"""``imagebatch plan`` prints the estimate from what the fleet's Redis learned."""

from __future__ import annotations

from pathlib import Path

import redis

from tests.harness import run_cli
from tests.runtime_support import text_client
from tests.unit.batch.test_plans import LINES
from worker.redis.state import State


def test_plan_prints_the_learned_estimate(
    redis_client: redis.Redis[bytes], redis_url: str, tmp_path: Path
) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\n".join(LINES) + b"\n")
    env = {
        "IMAGEBATCH_REDIS_URL": redis_url,
        "IMAGEBATCH_SIMULATOR_BASE_URL": "http://127.0.0.1:9/v2",
        "IMAGEBATCH_SIMULATOR_MAX_IN_FLIGHT": "50",
        "IMAGEBATCH_SIMULATOR_REQUESTS_PER_SECOND": "25",
        "IMAGEBATCH_SIMULATOR_POLLS_PER_SECOND": "100",
        "IMAGEBATCH_SIMULATOR_EXPECTED_LATENCY_S": "5",
    }
    cold = run_cli("plan", manifest, "--provider", "simulator", env=env)
    State(text_client(redis_url)).set_limits("simulator", cap=4, submit_rate=25.0)
    warm = run_cli("plan", manifest, "--provider", "simulator", env=env)

    assert cold.returncode == warm.returncode == 0, cold.stderr + warm.stderr
    assert cold.stdout.rstrip().endswith("est. 22s"), cold.stdout
    assert warm.stdout.rstrip().endswith("est. 4m12s"), warm.stdout  # 50 rounds of 5 s
