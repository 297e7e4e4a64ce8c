"""Building blocks for the fast runtime tests (records, Lua, steps, scheduler): a line record,
a batch seeded in the test Redis, and a ``Runtime`` on it. Plain functions, no fixtures, so
each test module wires exactly what it needs."""

from __future__ import annotations

import time
from typing import Any

import redis

from jobs.manifest.request import ImageRequest
from jobs.settings import CoreSettings, Settings
from jobs.storage import Store
from worker.lines.records import LineRecord, LineStatus
from worker.redis import keys
from worker.redis.state import State
from worker.runtime import Runtime

BATCH = "b1"
PROVIDER = "simulator"


def request_json(**fields: Any) -> str:
    """A valid line's request, as the record stores it."""
    values: dict[str, Any] = {"prompt": "a paper boat", "output_format": "png", **fields}
    return ImageRequest.model_validate(values).model_dump_json(exclude_none=True)


def record(
    idx: int = 0,
    *,
    batch: str = BATCH,
    provider: str = PROVIDER,
    status: LineStatus = LineStatus.READY,
    seq: int = 1,
    request: dict[str, Any] | None = None,
    **changes: Any,
) -> LineRecord:
    return LineRecord(
        batch=batch,
        idx=idx,
        line=idx + 1,
        id=f"line-{idx}",
        provider=provider,
        request_json=request_json(**(request or {})),
        status=status,
        seq=seq,
        settled=seq,
        **changes,
    )


def text_client(url: str) -> redis.Redis[str]:
    return redis.Redis.from_url(url, decode_responses=True)


def settings(redis_url: str, **values: Any) -> CoreSettings:
    """Settings for a test: the test Redis, nothing from the environment's IMAGEBATCH_*."""
    built: CoreSettings = Settings(_env_file=None, redis_url=redis_url, **values)  # type: ignore[call-arg]
    return built


def seed_batch(
    state: State,
    batch: str = BATCH,
    *,
    total: int = 10,
    out: str = "/nonexistent",
    window: int = 16,
    **fields: Any,
) -> None:
    """A running batch's record, as ``start_batch`` writes it (cursor at the start)."""
    record_ = {
        "batch_id": batch,
        "status": "running",
        "out": out,
        "provider": PROVIDER,
        "total": total,
        "cursor_idx": 0,
        "cursor_offset": 0,
        "cursor_line": 0,
        "admitted": 0,
        "window": window,
        "chunk_lines": 1000,
        **fields,
    }
    state.seed(batch, record_, {}, b"", {})


def put_line(state: State, rec: LineRecord, score: float | None = None) -> None:
    """Write a line record into Redis and its home zset, as admit and pump leave it."""
    data: dict[str | bytes, str] = {name: value for name, value in rec.to_hash().items()}
    state.client.hset(keys.line(rec.batch, rec.idx), mapping=data)
    home = rec.info.home.value
    zset = {
        "ready": keys.ready(rec.batch, rec.ready_queue),
        "flight": keys.flight(rec.provider),
        "store": keys.STORE,
    }.get(home)
    if zset is not None:
        state.client.zadd(zset, {rec.member: time.time() if score is None else score})
    if home == "ready" and rec.queue:
        state.client.sadd(keys.POOLS, rec.batch + rec.queue)
        state.client.sadd(keys.PROVIDERS, *rec.pool)
    elif home == "ready":
        state.client.sadd(keys.queues(rec.provider), rec.batch)
    state.client.sadd(keys.PROVIDERS, rec.provider)


def runtime(redis_url: str, **values: Any) -> Runtime:
    return Runtime(settings(redis_url, **values))


def record_reads(store: Store) -> list[str]:
    """The keys ``store.get`` is asked for from now on, in order."""
    reads: list[str] = []
    original = store.get

    def counting(key: str) -> bytes | None:
        reads.append(key)
        return original(key)

    store.get = counting  # type: ignore[method-assign]
    return reads


def plan_settings(redis_url: str) -> CoreSettings:
    """An account of 50 in flight at 25 submits/s (polls: 100/s) with 5 s jobs, on an
    unreachable simulator: what ``plan`` estimates from, with nothing spent."""
    return settings(
        redis_url,
        simulator_max_in_flight=50,
        simulator_requests_per_second=25,
        simulator_polls_per_second=100,
        simulator_expected_latency_s=5.0,
        simulator_base_url="http://127.0.0.1:9/v2",
    )
