"""Every Redis key imagebatch uses, built here and nowhere else (``B`` = batch id, ``P`` =
provider, ``I`` = a line's index among the manifest's counted lines).

Per batch (all removed by finalize, except the batch record with its summary):
    ib:B              hash    the batch record: status, out, total, cursor, window, summary…
    ib:B:n            hash    counters: done, succeeded, failed, rejected, credits:<currency>…
    ib:B:l:I          hash    one line in the window (``worker.lines.records.LineRecord``)
    ib:B:ready:P      zset    the batch's READY lines for provider P, by when they may be submitted
    ib:B:ready:@a,b   zset    the batch's READY pool lines that may go to a or b (cheapest first)
    ib:B:out          hash    providers out of the batch's pool for good (402, 401/403) -> why
    ib:B:rows         list    finished rows not yet written to a part file ("I<TAB>row json")
    ib:B:skip         bitmap  lines that already have a row (rejected, or done in a past run)
    ib:B:prior        hash    I -> attempts an earlier run made (numbering continues past them)
    ib:B:blob:I:K     bytes   image K of line I, sent inline, kept until it is stored
    ib:B:lock:NAME    string  feed / flush / finalize: one at a time per batch (token lock)
    ib:B:g:G          hash    one group of lines sent as one provider job (``GroupRecord``)
    ib:B:gm:G         hash    the group's lines: I -> the attempt it holds them at
    ib:B:groups       set     the batch's open groups

Shared by every batch:
    ib:batches        set     batches not yet finalized
    ib:providers      set     providers with lines in the window
    ib:queues:P       set     batches with READY lines for P (the pump takes them in turn)
    ib:pools          set     pool queues with READY lines ("B@a,b": batch B's, for a or b)
    ib:flight:P       zset    lines holding one of P's slots, by when they next need a step
    ib:store          zset    FETCHED lines, by when their store step is due (or its lease ends)
    ib:groups:P       zset    group provider P's open groups ("B G"), by when their next step
                              is due (or its lease ends)
    ib:limit:P        hash    P's limits: the cap and each request kind's rate, token bucket,
                              pause and counters (sent, 429s); the controller's state (ctl)
    ib:health:P       hash    P's breaker: failures in a row, cooling down until, probe out
    ib:latency:P:M    hash    learned job latency of model M at P (running mean and deviation,
                              and the share of it spent queued)
    ib:jobs:P         hash    provider job id -> "B I" (webhooks find their line)
    ib:scheduler      string  the scheduler's leader lock (token lock)
    ib:wake           list    events that should wake the scheduler at once
    ib:wake:at        string  when the sleeping scheduler means to look again (a poll due
                              sooner wakes it: apply.lua's ``due``)
    ib:worker:HOST:PID string a worker's heartbeat (``imagebatch health --worker``)
    ib:inbox:SHA:NAME string  an inbox manifest's claim (``worker.services.inbox``): state,
                              owner, batch
    imagebatch        list    the Celery queue every task goes to, on the broker (``QUEUE``)
"""

from __future__ import annotations

PREFIX = "ib"
QUEUE = "imagebatch"
"""The Celery queue (a Redis list on the broker) every imagebatch task goes to."""

BATCHES = f"{PREFIX}:batches"
PROVIDERS = f"{PREFIX}:providers"
STORE = f"{PREFIX}:store"
POOLS = f"{PREFIX}:pools"
SCHEDULER = f"{PREFIX}:scheduler"
WAKE = f"{PREFIX}:wake"
WAKE_AT = f"{PREFIX}:wake:at"

LINE_FORMAT = PREFIX + ":%s:l:%s"
"""``LINE_FORMAT % (batch, idx)``; Lua scripts receive it so they can reach a member's line."""
READY_FORMAT = PREFIX + ":%s:ready:%s"
"""``READY_FORMAT % (batch, provider)``: Lua scripts reach a batch's READY lines with it."""
QUEUES_FORMAT = PREFIX + ":queues:%s"
"""``QUEUES_FORMAT % provider``: the batches with READY lines for the provider."""
OUT_FORMAT = PREFIX + ":%s:out"
HEALTH_FORMAT = PREFIX + ":health:%s"
LIMIT_FORMAT = PREFIX + ":limit:%s"
FLIGHT_FORMAT = PREFIX + ":flight:%s"
"""Lua scripts reach another provider's keys (a pool's cheaper members) with these."""


def batch(b: str) -> str:
    return f"{PREFIX}:{b}"


def counters(b: str) -> str:
    return f"{PREFIX}:{b}:n"


def line(b: str, idx: int) -> str:
    return LINE_FORMAT % (b, idx)


def line_pattern(b: str) -> str:
    return f"{PREFIX}:{b}:l:*"


def rows(b: str) -> str:
    return f"{PREFIX}:{b}:rows"


def skip(b: str) -> str:
    return f"{PREFIX}:{b}:skip"


def prior(b: str) -> str:
    return f"{PREFIX}:{b}:prior"


def blob(b: str, idx: int, k: int) -> str:
    return f"{PREFIX}:{b}:blob:{idx}:{k}"


def lock(b: str, name: str) -> str:
    return f"{PREFIX}:{b}:lock:{name}"


def batch_pattern(b: str) -> str:
    """Every key of one batch except its record (``ib:B``)."""
    return f"{PREFIX}:{b}:*"


def ready(b: str, provider: str) -> str:
    """The batch's READY lines for ``provider`` (one zset per batch: the pump shares a
    provider's slots between batches in turn, so a small batch never waits behind a big one)."""
    return READY_FORMAT % (b, provider)


def queues(provider: str) -> str:
    return QUEUES_FORMAT % provider


def flight(provider: str) -> str:
    return FLIGHT_FORMAT % provider


def limit(provider: str) -> str:
    return LIMIT_FORMAT % provider


def health(provider: str) -> str:
    return HEALTH_FORMAT % provider


def out(b: str) -> str:
    """The providers that left batch ``b``'s pool for good, each with why."""
    return OUT_FORMAT % b


def latency(provider: str, model: str) -> str:
    return f"{PREFIX}:latency:{provider}:{model}"


def jobs(provider: str) -> str:
    return f"{PREFIX}:jobs:{provider}"


def group(b: str, g: str) -> str:
    return f"{PREFIX}:{b}:g:{g}"


def group_members(b: str, g: str) -> str:
    return f"{PREFIX}:{b}:gm:{g}"


def batch_groups(b: str) -> str:
    return f"{PREFIX}:{b}:groups"


def groups(provider: str) -> str:
    return f"{PREFIX}:groups:{provider}"


GROUP_FORMAT = PREFIX + ":%s:g:%s"
"""``GROUP_FORMAT % (batch, group)``: Lua scripts reach a member's group with it."""


def worker(host: str, pid: int) -> str:
    """One worker process's heartbeat (several may share a host)."""
    return f"{PREFIX}:worker:{host}:{pid}"


def workers(host: str = "*") -> str:
    """The heartbeats of every worker on ``host`` (a SCAN pattern; ``*``: the fleet)."""
    return f"{PREFIX}:worker:{host}:*"


def inbox_claim(name: str, sha256: str) -> str:
    """By name and content, not the inbox's path: schedulers that mount one folder at
    different paths agree, and the key matches the batch id derived from the same two."""
    return f"{PREFIX}:inbox:{sha256}:{name}"


RESERVED = frozenset(
    {"batches", "providers", "queues", "pools", "flight", "store", "limit", "latency", "jobs"}
    | {"health", "groups"}
    | {"scheduler", "wake", "worker", "inbox"}
)
"""Words of the shared keys: a batch with one of these ids would collide with them."""


def member(b: str, idx: int) -> str:
    """A line's member in the shared zsets."""
    return f"{b} {idx}"


def parse_member(value: str) -> tuple[str, int]:
    b, _, idx = value.rpartition(" ")
    return b, int(idx)
