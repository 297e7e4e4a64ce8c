"""How close imagebatch runs to the provider's limit, and what it costs to orchestrate.

Each case runs ``imagebatch run`` on a real redis-server with real ``imagebatch worker``
processes against the built-in simulator, whose account limits (jobs in flight, requests per
second) are set as the case says, and prints, from that one run:

    wall/ideal    wall time over the provider-bound ideal, max(N x latency / cap, N / rate):
                  every slot busy all the time, or every submit at the account's rate
    polls/job     GET /v2/jobs/:id requests per job
    429s          rate-limit answers the run provoked (the account's limits below ours),
                  and those after the run's first minute; apart, those the provider sent for
                  its own reasons (noise)
    cpu/1k        CPU-seconds per 1,000 images: workers + the run command + Redis
    redis/img     Redis commands per image (INFO commandstats: Celery's and imagebatch's,
                  including the ones run inside Lua scripts)
    plan/wall     ``plan``'s time estimate over the wall time: cold (configured limits and
                  latency) and learned (after the run, from what it taught Redis)
    best          the wall time of a client with no overhead at all, given this run's jobs:
                  each submit at the account's rate as soon as a slot is free, each slot
                  freed the instant its job ends (what the ideal's mean latency hides: the
                  last jobs start when the first ones end, and the slowest of them sets the
                  end)

    .venv/bin/python bench/throughput.py [catalog] [fleet] [noisy] [cold] [bare] [limited]
                                         [big] [scaling] [webhooks] [-v]

``catalog``, ``fleet``, ``noisy`` and ``cold`` are issue 15's table: 3 s jobs (±30 %) on accounts
that limit submits and jobs in flight; the first three also run bench/asyncio_script.py (the
plain semaphore + gather script a user would write) told the same limits, and print both.
"""

from __future__ import annotations

import heapq
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.asyncio_script import ScriptResult, run_script
from bench.fleet import CLI, Run, env_for, manifest, redis_server, run_batch
from jobs.simulator import Simulator, SimulatorConfig
from tests.servers import free_port


@dataclass(frozen=True)
class Case:
    name: str
    lines: int
    latency_s: float
    """The jobs' mean duration at the provider."""
    account_cap: int | None
    """The account's real in-flight limit (the simulator's), None for unlimited."""
    account_rps: float | None
    """The account's real submit rate (requests per second); None for unlimited."""
    workers: int = 1
    settings: dict[str, str] = field(default_factory=dict)
    """imagebatch's own settings: what the user told it about the account, if anything."""
    image_mode: str = "full"
    webhooks: bool = False
    jitter: float = 0.0
    """Each job takes ``latency_s`` ± this share of it (uniform)."""
    scope: str = "all"
    """What the account's rate limit counts: ``all`` requests, or ``submits`` only."""
    faults: dict[str, float] = field(default_factory=dict)
    script: bool = False
    """Also run the plain asyncio script (bench/asyncio_script.py) told the same limits."""

    def ideal(self, cap: int, rps: float) -> float:
        """The provider's bound: every slot busy all the time, or every submit at the rate."""
        return max(self.lines * self.latency_s / cap, self.lines / rps)


def told(cap: int, submits: float, polls: float = 200.0) -> dict[str, str]:
    """The account's limits as a user configures them (polls: an account that limits submits
    only leaves reads free; 200/s is what we allow ourselves)."""
    return {
        "IMAGEBATCH_APIFRAME_MAX_IN_FLIGHT": str(cap),
        "IMAGEBATCH_APIFRAME_SUBMITS_PER_SECOND": str(submits),
        "IMAGEBATCH_APIFRAME_POLLS_PER_SECOND": str(polls),
    }


def table_case(name: str, lines: int, cap: int, rps: float, **extra: Any) -> Case:
    """One of issue 15's rows: 3 s jobs (±30 %) on an account that limits submits and jobs in
    flight, imagebatch told the account's limits, the asyncio script beside it."""
    values: dict[str, Any] = {"settings": told(cap, rps), "script": True} | extra
    return Case(name, lines, 3.0, cap, rps, jitter=0.3, scope="submits", **values)


def cases() -> dict[str, Case]:
    return {
        "catalog": table_case("catalog_200", 200, 16, 10.0),
        "fleet": table_case("fleet_1000", 1000, 50, 25.0),
        "noisy": table_case("noisy_400", 400, 50, 25.0, faults={"submit_429": 0.03}),
        # not told: imagebatch's defaults (64 in flight, 20 requests/s) above the account's
        "cold": Case("cold_19", 19, 3.0, 16, 10.0, jitter=0.3, scope="submits"),
        # the catalog account for longer, and not told: 429s once the limits are learned
        "limited": Case("limited_1000", 1000, 3.0, 16, 10.0, jitter=0.3, scope="submits"),
        # the catalog case without report previews: what orchestrating the batch alone costs
        "bare": table_case(
            "catalog_bare",
            200,
            16,
            10.0,
            settings={**told(16, 10), "IMAGEBATCH_REPORT_PREVIEWS": "0"},
            script=False,
        ),
        # orchestration-bound: fast jobs, tiny images, limits far above what one worker drives
        "scaling": Case(
            "scaling_1500",
            1500,
            0.2,
            None,
            None,
            image_mode="tiny",
            settings={**told(400, 2000, 2000), "IMAGEBATCH_WINDOW": "2000"},
        ),
        "webhooks": table_case("webhooks_200", 200, 16, 10.0, webhooks=True, script=False),
        "big": Case("big_2000", 2000, 5.0, 50, None, settings=told(50, 100)),
    }


def measure(case: Case, server: Any, workers: int | None = None) -> tuple[Run, float]:
    config = simulator_config(case)
    with Simulator(config) as sim, tempfile.TemporaryDirectory() as tmp:
        source = manifest(Path(tmp) / f"{case.name}.jsonl", case.lines)
        settings = dict(case.settings)
        with receiving(case, server, sim, settings):
            run = run_batch(server, sim, source, workers=workers or case.workers, extra=settings)
    return run, ideal_of(case)


def simulator_config(case: Case) -> SimulatorConfig:
    low = case.latency_s * (1 - case.jitter)
    return SimulatorConfig.from_mapping(
        {
            "latency_s": low,
            "latency_jitter_s": 2 * case.latency_s * case.jitter,
            "max_in_flight": case.account_cap,
            "rate_limit_rps": case.account_rps,
            "rate_limit_burst": int(case.account_rps or 10),
            "rate_limit_scope": case.scope,
            "image_mode": case.image_mode,
            "faults": case.faults,
        }
    )


def ideal_of(case: Case) -> float:
    cap = case.account_cap or 10**9
    told_rps = case.settings.get("IMAGEBATCH_APIFRAME_SUBMITS_PER_SECOND", "20")
    return case.ideal(cap, case.account_rps or float(told_rps))


def measure_script(case: Case) -> ScriptResult:
    """The asyncio script on the same account (a simulator of its own, reset)."""
    with Simulator(simulator_config(case)) as sim, tempfile.TemporaryDirectory() as tmp:
        source = manifest(Path(tmp) / f"{case.name}.jsonl", case.lines)
        cap = case.account_cap or 64
        rps = case.account_rps or 20.0
        return run_script(sim.base_url, "afk_benchmark_key", source, Path(tmp) / "out", cap, rps)


@contextmanager
def receiving(case: Case, server: Any, sim: Any, settings: dict[str, str]) -> Iterator[None]:
    """For a webhook case: ``imagebatch webhook`` running, and submits asking for webhooks."""
    if not case.webhooks:
        yield
        return
    port = free_port()
    settings["IMAGEBATCH_WEBHOOK_URL"] = f"http://127.0.0.1:{port}"
    env = env_for(server.url, sim.base_url, Path(tempfile.gettempdir()), settings)
    process = subprocess.Popen(
        [*CLI, "webhook", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(3)
        yield
    finally:
        process.terminate()
        process.wait(20)


def throttled_and_sent(ledger: dict[str, Any]) -> tuple[int, int, int]:
    """429s our load provoked (concurrency, rate), 429s the provider sent for its own reasons
    (injected faults), and requests sent."""
    limited = ledger.get("rate_limited", {})
    provoked = sum(int(n) for cause, n in limited.items() if cause != "fault")
    return provoked, int(limited.get("fault", 0)), sum(ledger["requests"].values())


def best_possible(durations: list[float], cap: int | None, rps: float | None) -> float:
    """The wall time of a client with no overhead at all running jobs of these durations, in
    this order, on the account: submits at ``rps`` (a bucket of ``rps`` tokens, full at the
    start, as the simulator's), each into a slot the moment one is free, up to ``cap``."""
    burst = max(1, int(rps or 1))
    running: list[float] = []
    last = 0.0
    for i, duration in enumerate(durations):
        start = max(0.0, (i - burst + 1) / rps) if rps else 0.0
        if cap and len(running) >= cap:
            start = max(start, heapq.heappop(running))
        heapq.heappush(running, start + duration)
        last = max(last, start + duration)
    return last


def report(case: Case, run: Run, ideal: float) -> str:
    ledger, summary = run.ledger, run.summary
    jobs = max(1, ledger["submits"])
    polls = sum(n for label, n in ledger["requests"].items() if label.startswith("GET /v2/jobs/"))
    provoked, noise, requests = throttled_and_sent(ledger)
    later = ""
    if run.ledger_at_minute is not None:
        early, _, early_sent = throttled_and_sent(run.ledger_at_minute)
        after, sent = provoked - early, requests - early_sent
        later = f", after the first minute {after} ({100 * after / max(1, sent):.1f}% of {sent})"
    noisy = f" · 429s sent as noise {noise}" if noise else ""
    causes = {k: v for k, v in ledger.get("rate_limited", {}).items() if v and k != "fault"}
    if causes:
        noisy += f" · provoked by {', '.join(f'{k} {v}' for k, v in sorted(causes.items()))}"
    images = (
        sum(job["images"] for job in ledger["jobs"] if job["status"] == "COMPLETED")
        or summary["succeeded"]
    )
    jobs_in_order = sorted(ledger["jobs"], key=lambda job: job["created_ms"])
    best = best_possible(
        [job["duration_s"] for job in jobs_in_order if job["status"] == "COMPLETED"],
        case.account_cap,
        case.account_rps,
    )
    return (
        f"{case.name:<12} {summary['succeeded']:>5} ok {summary['failed']:>3} failed · "
        f"wall {run.wall_s:6.1f}s ideal {ideal:6.1f}s → wall/ideal {run.wall_s / ideal:4.2f} "
        f"(best possible {best:.1f}s, {best / ideal:4.2f}) · "
        f"polls/job {polls / jobs:4.2f} · 429s provoked {provoked} "
        f"({100 * provoked / max(1, requests):.1f}% of {requests} requests{later}){noisy} · "
        f"cpu/1k {1000 * run.cpu_s / max(1, images):5.1f}s "
        f"({', '.join(f'{k} {v:.1f}' for k, v in run.cpu_by_process.items())}) · "
        f"redis/img {run.redis_commands / max(1, images):5.1f} · "
        f"plan/wall cold {run.plan_cold_s / run.wall_s:4.2f} "
        f"learned {run.plan_learned_s / run.wall_s:4.2f}"
    )


def script_report(case: Case, result: ScriptResult, ideal: float, run: Run) -> str:
    """The asyncio script's line, and how imagebatch compares with it in this run."""
    images = max(1, result.succeeded)
    cpu = 1000 * result.cpu_s / images
    ours = 1000 * run.cpu_s / max(1, run.summary["succeeded"])
    return (
        f"   asyncio script: {result.succeeded} ok {result.failed} failed · wall "
        f"{result.wall_s:6.1f}s → wall/ideal {result.wall_s / ideal:4.2f} · 429s met "
        f"{result.rate_limited} · cpu/1k {cpu:5.1f}s · imagebatch vs the script: wall "
        f"{run.wall_s / result.wall_s:4.2f}x, cpu {ours / cpu:4.2f}x"
    )


def timeline(run: Run, cap: int | None) -> str:
    """Where the wall time went, from the simulator's own job times: startup until the first
    submit, the ramp to the account's cap, how full the cap was kept, and the tail."""
    jobs = sorted(
        (job["created_ms"] / 1000 - run.started_wall, job["duration_s"])
        for job in run.ledger["jobs"]
        if job["status"] == "COMPLETED"
    )
    if not jobs:
        return "   timeline: no completed jobs"
    first, last_submit = jobs[0][0], jobs[-1][0]
    last_done = max(start + duration for start, duration in jobs)
    events = sorted([(s, 1) for s, _ in jobs] + [(s + d, -1) for s, d in jobs])
    level, peak_at, busy, previous = 0, None, 0.0, first
    for at, step in events:
        if previous < last_submit:
            busy += level * (min(at, last_submit) - previous)
        previous = at
        level += step
        if cap and peak_at is None and level >= cap:
            peak_at = at
    span = max(1e-9, last_submit - first)
    occupancy = busy / span / cap if cap else float("nan")
    refill = ""
    if cap and len(jobs) > 2 * cap:
        # Once the cap binds, the k-th job to end frees the slot the (k + cap)-th job takes.
        ends = sorted(start + duration for start, duration in jobs)
        gaps = sorted(jobs[k + cap][0] - ends[k] for k in range(len(jobs) - cap))
        refill = (
            f" · slot refill after a job ends: median {1000 * gaps[len(gaps) // 2]:.0f} ms, "
            f"p90 {1000 * gaps[9 * len(gaps) // 10]:.0f} ms"
        )
    ramp = "never" if peak_at is None else f"{peak_at - first:.2f}s later"
    work = (
        f" · the jobs' own durations fill {sum(d for _, d in jobs) / cap:.2f}s of {cap} slots"
        if cap
        else ""
    )
    return (
        f"   timeline: first submit {first:.2f}s{work} · cap reached {ramp} "
        f"· occupancy while submitting {occupancy:.1%} · last job done {last_done:.2f}s · "
        f"run ended {run.wall_s - last_done:.2f}s after it{refill}"
    )


def main() -> None:
    wanted = [a for a in sys.argv[1:] if not a.startswith("-")] or ["catalog"]
    table = cases()
    with redis_server() as server:
        for name in wanted:
            case = table[name]
            if name == "scaling":
                one, ideal = measure(case, server, workers=1)
                print(report(case, one, ideal) + " · 1 worker", flush=True)
                two, ideal = measure(case, server, workers=2)
                print(report(case, two, ideal) + " · 2 workers", flush=True)
                print(
                    f"scaling      2 workers vs 1: {one.wall_s / two.wall_s:.2f}x the throughput",
                    flush=True,
                )
                continue
            run, ideal = measure(case, server)
            print(report(case, run, ideal), flush=True)
            if case.script:
                print(script_report(case, measure_script(case), ideal, run), flush=True)
            if "-v" in sys.argv:
                top = sorted(run.commands_by_name.items(), key=lambda kv: -kv[1])[:14]
                print("   top commands:", ", ".join(f"{k} {v}" for k, v in top), flush=True)
                print(timeline(run, case.account_cap), flush=True)


if __name__ == "__main__":
    main()
