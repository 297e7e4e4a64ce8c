"""How close imagebatch runs to the provider's limit, and what it costs to orchestrate.

Each case runs ``imagebatch run`` on a real redis-server with real ``imagebatch worker``
processes against the built-in simulator, whose account limits (jobs in flight, requests per
second) are set as the case says, and prints, from that one run:

    wall/ideal    wall time over the provider-bound ideal, max(ceil(N / cap) x latency,
                  N / rate): the best any client could do with one request per job
    polls/job     GET /v2/jobs/:id requests per job
    429s          rate-limit answers the run provoked (the account's limits below ours)
    cpu/1k        CPU-seconds per 1,000 images: workers + the run command + Redis
    redis/img     Redis commands per image (INFO commandstats: Celery's and imagebatch's,
                  including the ones run inside Lua scripts)

    .venv/bin/python bench/throughput.py [catalog] [fleet] [big] [scaling] [webhooks]
"""

from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.fleet import Run, manifest, redis_server, run_batch  # noqa: E402
from jobs.simulator import Simulator, SimulatorConfig  # noqa: E402


@dataclass(frozen=True)
class Case:
    name: str
    lines: int
    latency_s: float
    account_cap: int | None
    """The account's real in-flight limit (the simulator's), None for unlimited."""
    account_rps: float | None
    workers: int = 1
    settings: dict[str, str] = field(default_factory=dict)
    """imagebatch's own settings (its configured caps may be above the account's)."""
    image_mode: str = "full"

    def ideal(self, cap: int, rps: float) -> float:
        return max(math.ceil(self.lines / cap) * self.latency_s, self.lines / rps)


def cases() -> dict[str, Case]:
    return {
        # 200 catalog lines, 3 s jobs; the account allows 16 jobs and 10 requests/s, below
        # our defaults (64 and 20/s): the limiter has to find the real limits.
        "catalog": Case("catalog_200", 200, 3.0, 16, 10.0),
        "fleet": Case(
            "fleet_1000",
            1000,
            3.0,
            50,
            25.0,
            settings={
                "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": "50",
                "IMAGEBATCH_APIFRAME_REQUESTS_PER_SECOND": "25",
            },
        ),
        "big": Case(
            "big_2000",
            2000,
            5.0,
            50,
            None,
            settings={
                "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": "50",
                "IMAGEBATCH_APIFRAME_REQUESTS_PER_SECOND": "100",
            },
        ),
    }


def measure(case: Case, server: Any) -> tuple[Run, float]:
    config = SimulatorConfig(
        latency_s=case.latency_s,
        max_in_flight=case.account_cap,
        rate_limit_rps=case.account_rps,
        rate_limit_burst=int(case.account_rps or 10),
        image_mode=case.image_mode,  # type: ignore[arg-type]
    )
    with Simulator(config) as sim, tempfile.TemporaryDirectory() as tmp:
        source = manifest(Path(tmp) / f"{case.name}.jsonl", case.lines)
        run = run_batch(server, sim, source, workers=case.workers, extra=case.settings)
    cap = case.account_cap or 10**9
    rps = case.account_rps or float(case.settings.get("IMAGEBATCH_APIFRAME_REQUESTS_PER_SECOND", 20))
    return run, case.ideal(cap, rps)


def report(case: Case, run: Run, ideal: float) -> str:
    ledger, summary = run.ledger, run.summary
    jobs = max(1, ledger["submits"])
    polls = sum(n for label, n in ledger["requests"].items() if label.startswith("GET /v2/jobs/"))
    limited = ledger.get("rate_limited", {})
    throttled = sum(int(v) for v in limited.values()) if isinstance(limited, dict) else 0
    requests = sum(ledger["requests"].values())
    images = sum(
        job["images"] for job in ledger["jobs"] if job["status"] == "COMPLETED"
    ) or summary["succeeded"]
    return (
        f"{case.name:<12} {summary['succeeded']:>5} ok {summary['failed']:>3} failed · "
        f"wall {run.wall_s:6.1f}s ideal {ideal:6.1f}s → wall/ideal {run.wall_s / ideal:4.2f} · "
        f"polls/job {polls / jobs:4.2f} · 429s {throttled} ({100 * throttled / max(1, requests):.1f}%"
        f" of {requests} requests) · cpu/1k {1000 * run.cpu_s / max(1, images):5.1f}s "
        f"({', '.join(f'{k} {v:.1f}' for k, v in run.cpu_by_process.items())}) · "
        f"redis/img {run.redis_commands / max(1, images):5.1f}"
    )


def main() -> None:
    wanted = sys.argv[1:] or ["catalog"]
    table = cases()
    with redis_server() as server:
        for name in wanted:
            case = table[name]
            run, ideal = measure(case, server)
            print(report(case, run, ideal), flush=True)
            if "-v" in sys.argv or True:
                top = sorted(run.commands_by_name.items(), key=lambda kv: -kv[1])[:14]
                print("   top commands:", ", ".join(f"{k} {v}" for k, v in top), flush=True)


if __name__ == "__main__":
    main()
