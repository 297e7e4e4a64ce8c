"""The plain asyncio baseline of the benchmarks, run against an in-process simulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from bench.asyncio_script import run_script
from bench.fleet import manifest
from jobs.simulator import Simulator, SimulatorConfig

KEY = "afk_script_key"


@pytest.fixture
def sim() -> Iterator[Simulator]:
    config = SimulatorConfig(latency_s=0.1, image_mode="tiny")
    with Simulator(config) as simulator:
        yield simulator


def test_script_writes_each_image_and_counts_failed_jobs(sim: Simulator, tmp_path: Path) -> None:
    source = manifest(tmp_path / "lines.jsonl", 4)
    with source.open("a") as lines:
        lines.write(json.dumps({"id": "bad", "prompt": "[[policy]] x", "quality": "low"}) + "\n")
    out = tmp_path / "out"
    result = run_script(sim.base_url, KEY, source, out, cap=3, submits_per_s=20)
    assert (result.succeeded, result.failed, result.rate_limited) == (4, 1, 0)
    files = sorted(p.name for p in out.iterdir())
    assert files == [f"item-{i:06d}-1.png" for i in range(4)]
    for name in files:
        with Image.open(out / name) as image:
            assert image.format == "PNG"
    ledger = sim.ledger()
    assert ledger["submits"] == 5
    assert ledger["requests"]["GET /v2/jobs/{id} 200"] == 5, "one poll, 2 s after the submit"
    assert result.wall_s >= 2 and 0 < result.cpu_s < result.wall_s


def test_script_waits_out_a_429_in_its_slot_and_pays_once(sim: Simulator, tmp_path: Path) -> None:
    sim.update(max_in_flight=1)
    source = manifest(tmp_path / "lines.jsonl", 2)
    result = run_script(sim.base_url, KEY, source, tmp_path / "out", cap=2, submits_per_s=20)
    assert (result.succeeded, result.failed, result.rate_limited) == (2, 0, 1)
    ledger = sim.ledger()
    assert ledger["submits"] == 2 and ledger["rate_limited"]["concurrency"] == 1
    assert result.wall_s >= 3, "Retry-After (1 s), then the first poll 2 s later"
