"""A pool's throughput is the sum of its accounts' limits (issue 19).

Three accounts of 8 jobs in flight each (APIFrame, OpenAI, Omixa on the built-in simulator,
3 s jobs), pooled with ``--provider apiframe,openai,omixa``: the cheapest takes what its slots
allow and the overflow goes down the list, so the batch runs near the ideal of 24 in flight.
Prints, from one run: wall time over that ideal, the lines each account served, 429s.

    .venv/bin/python bench/pool.py [LINES]
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataclasses import replace

from bench.fleet import manifest, redis_server, run_batch
from bench.throughput import timeline
from jobs.simulator import Simulator, SimulatorConfig

ACCOUNTS = {"apiframe": "afk_bench_pool", "openai": "sk-bench-pool", "omixa": "sk-bench-omixa"}
CAP = 8
LATENCY_S = 3.0


def settings(sim: Simulator) -> dict[str, str]:
    """Each account's key, URL and real limits, as a user tells them; APIFrame's credit at
    $0.001 (its low-quality image $0.004 < OpenAI $0.009 < Omixa $0.011)."""
    found = {"IMAGEBATCH_USD_PER_CREDIT_APIFRAME": "0.001", "IMAGEBATCH_WINDOW": "200"}
    for name, key in ACCOUNTS.items():
        upper = name.upper()
        found |= {
            f"IMAGEBATCH_{upper}_API_KEY": key,
            f"IMAGEBATCH_{upper}_BASE_URL": sim.url_for(name),
            f"IMAGEBATCH_{upper}_MAX_IN_FLIGHT": str(CAP),
            f"IMAGEBATCH_{upper}_REQUESTS_PER_SECOND": "20",
        }
    return found


def main() -> None:
    lines = int(sys.argv[1]) if len(sys.argv) > 1 else 240
    config = SimulatorConfig.from_mapping(
        {
            "latency_s": LATENCY_S,
            "sync_latency_s": LATENCY_S,
            "image_mode": "tiny",
            "providers": {name: {"max_in_flight": CAP} for name in ACCOUNTS},
        }
    )
    ideal = lines * LATENCY_S / (CAP * len(ACCOUNTS))
    with redis_server() as server, Simulator(config) as sim, tempfile.TemporaryDirectory() as tmp:
        source = manifest(Path(tmp) / "pool.jsonl", lines)
        run = run_batch(
            server,
            sim,
            source,
            concurrency=32,
            extra=settings(sim),
            provider=",".join(ACCOUNTS),
        )
    served = Counter({name: part["lines"] for name, part in run.summary["by_provider"].items()})
    throttled = run.ledger["rate_limited"]
    print(
        f"pool_{lines}: wall {run.wall_s:.1f}s · ideal {ideal:.1f}s (24 in flight) · "
        f"wall/ideal {run.wall_s / ideal:.2f} (goal ≤ 1.15) · served "
        + ", ".join(f"{name} {served[name]}" for name in ACCOUNTS)
        + f" · 429s {sum(throttled.values())} · usd {run.summary['usd']}"
    )
    for name in ACCOUNTS:
        jobs = [job for job in run.ledger["jobs"] if job["provider"] == name]
        print(f"  {name}:" + timeline(replace(run, ledger={"jobs": jobs}), CAP).strip()[8:])


if __name__ == "__main__":
    main()
