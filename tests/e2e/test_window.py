"""The window: Redis holds only the lines near their turn, however long the manifest; and a
provider slot that frees is always taken by a waiting line (none waits for a sweeper)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import redis

from jobs.simulator import Simulator, SimulatorConfig
from tests.harness import check_invariants, read_local, run_cli, start_worker, stop, wait_for
from worker.redis import keys

KEY = "afk_window_test_key_0123456789"


def manifest(path: Path, count: int) -> Path:
    with path.open("w") as out:
        for i in range(count):
            line = {
                "id": f"tile-{i:05d}",
                "prompt": f"Seamless ceramic tile pattern number {i}",
                "size": "1024x1024",
                "output_format": "png",
                "quality": "low",
            }
            out.write(json.dumps(line) + "\n")
    return path


def fleet_env(redis_url: str, sim: Simulator, cap: int, out: Path, **extra: str) -> dict[str, str]:
    """A fleet on the test Redis, APIFrame on the simulator with ``cap`` jobs in flight."""
    return {
        "IMAGEBATCH_BROKER_URL": redis_url,
        "IMAGEBATCH_APIFRAME_BASE_URL": sim.base_url,
        "IMAGEBATCH_APIFRAME_API_KEY": KEY,
        "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": str(cap),
        "IMAGEBATCH_APIFRAME_REQUESTS_PER_SECOND": "200",
        "IMAGEBATCH_OUT": str(out),
        **extra,
    }


def submit_tiles(source: Path, batch: str, env: dict[str, str]) -> dict[str, str]:
    submitted = run_cli(
        "submit", str(source), "--provider", "apiframe", "--batch-id", batch, env=env
    )
    assert submitted.returncode == 0, submitted.stderr
    return env


class Sampler(threading.Thread):
    """Samples Redis while a batch runs: line records held, and slots left idle while READY
    lines that are due wait (from the first job in flight on)."""

    def __init__(self, url: str, batch: str, provider: str, cap: int) -> None:
        super().__init__(daemon=True)
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.batch, self.provider, self.cap = batch, provider, cap
        self.most_lines = 0
        self.samples = 0
        self.idle_since: float | None = None
        self.longest_idle = 0.0
        self.working = False
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.1):
            try:
                held = sum(1 for _ in self.client.scan_iter(match=keys.line_pattern(self.batch)))
                in_flight = self.client.zcard(keys.flight(self.provider))
                due = self.client.zcount(
                    keys.ready(self.batch, self.provider), "-inf", time.time() - 0.5
                )
            except redis.RedisError:
                continue
            self.samples += 1
            self.most_lines = max(self.most_lines, held)
            now = time.monotonic()
            # Idle slots count once the workers are up (the first job in flight), not while
            # they start.
            self.working = self.working or in_flight > 0
            if self.working and due and in_flight < self.cap:
                self.idle_since = self.idle_since or now
                self.longest_idle = max(self.longest_idle, now - self.idle_since)
            else:
                self.idle_since = None

    def stop(self) -> None:
        self.stopped.set()
        self.join(5)
        self.client.close()


def test_a_batch_twenty_times_the_window_runs_with_redis_holding_only_the_window(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    # Given a window of 16 lines and a manifest of 320 (20 windows)
    window, lines, cap = 16, 320, 8
    source = manifest(tmp_path / "tiles.jsonl", lines)
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=0.2, image_mode="tiny")) as sim:
        extra = {"IMAGEBATCH_WINDOW": str(window), "IMAGEBATCH_CHUNK_LINES": "50"}
        env = submit_tiles(source, "tiles", fleet_env(redis_url, sim, cap, out, **extra))
        # When a worker runs it, with Redis sampled all along
        sampler = Sampler(redis_url, "tiles", "apiframe", cap)
        sampler.start()
        worker = start_worker(env, "window", tmp_path / "worker.log", concurrency=8)
        try:
            wait_for(
                lambda: redis_client.hget(keys.batch("tiles"), "summary"),
                240,
                "the batch to finish",
                interval=0.5,
            )
        finally:
            sampler.stop()
            stop(worker)
        ledger = sim.ledger()

    # Then every invariant holds, each line bought once...
    outcome = read_local(out, "tiles")
    check_invariants(source, outcome, ledger, redis_client, idempotent=True)
    assert [row.status for row in outcome.rows] == ["succeeded"] * lines
    assert ledger["submits"] == lines
    # ...and Redis never held more line records than the window
    assert sampler.samples > 50, sampler.samples
    assert 0 < sampler.most_lines <= window, sampler.most_lines
    # ...while the finished rows went to part files of 50 lines, read back in order
    parts = sorted(p.name for p in (out / "tiles" / ".state" / "parts").iterdir())
    assert parts == [f"{chunk:06d}.jsonl" for chunk in range(lines // 50 + 1)]


def test_a_freed_slot_is_taken_at_once_by_a_waiting_line(
    tmp_path: Path, redis_url: str, redis_client: redis.Redis[Any]
) -> None:
    """The defect: lines sat parked with no slot in use for over a minute, until a sweeper
    found them. A slot that frees must always go to a line that is waiting for one."""
    lines, cap = 240, 8
    source = manifest(tmp_path / "tiles.jsonl", lines)
    out = tmp_path / "out"
    with Simulator(SimulatorConfig(latency_s=0.4, latency_jitter_s=0.4, image_mode="tiny")) as sim:
        env = submit_tiles(source, "slots", fleet_env(redis_url, sim, cap, out))
        sampler = Sampler(redis_url, "slots", "apiframe", cap)
        sampler.start()
        workers = [
            start_worker(env, f"slots{i}", tmp_path / f"w{i}.log", concurrency=8) for i in range(2)
        ]
        started = time.monotonic()
        try:
            wait_for(
                lambda: redis_client.hget(keys.batch("slots"), "summary"),
                240,
                "the batch to finish",
                interval=0.3,
            )
            elapsed = time.monotonic() - started
        finally:
            sampler.stop()
            for worker in workers:
                stop(worker)
        ledger = sim.ledger()
    outcome = read_local(out, "slots")
    check_invariants(source, outcome, ledger, redis_client, idempotent=True)
    assert ledger["submits"] == lines
    # Never did a due line wait while a slot stood free for more than a moment...
    assert sampler.samples > 20, sampler.samples
    assert sampler.longest_idle < 3.0, sampler.longest_idle
    # ...so the batch took about its provider time: 30 waves of 0.4-0.8 s jobs
    assert elapsed < 2.5 * lines / cap * 0.8 + 15, elapsed
