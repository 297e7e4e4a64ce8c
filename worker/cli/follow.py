"""Following a batch from the terminal until it ends: its progress (a bar, or piped records),
Ctrl-C or SIGTERM landing it (no new submits, paid jobs waited for, the command that resumes
it printed) when this process owns its run, and a Redis that stops answering ridden out, or
its end said, with the command that resumes.
"""

from __future__ import annotations

import shlex
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from jobs.errors import ConfigError, ImagebatchError
from worker.batch import control, finish, snapshot, status
from worker.cli.output import notice, out_console
from worker.cli.progress import Display
from worker.redis.connect import Unavailable
from worker.runtime import Runtime

if TYPE_CHECKING:
    from worker.celery.embedded import EmbeddedRedis

FOLLOW_S = 0.25
"""How often a run reads its batch's progress (a few Redis reads): it ends this soon after
the batch does. The display prints at its own pace."""

SETTLE_S = 0.5
"""After Ctrl-C, how long the last tasks get to write their counts once no line is in flight."""


class RedisLost(Exception):
    """Redis stopped answering for longer than ``IMAGEBATCH_REDIS_OUTAGE_S`` during ``run``."""

    def __init__(self, seconds: float) -> None:
        super().__init__(seconds)
        self.seconds = seconds


class OwnRedisGone(Exception):
    """The embedded Redis this run started has ended: nothing can bring it (and the batch's
    live state in it) back, so there is nothing to wait for."""

    def __init__(self, how: str) -> None:
        super().__init__(how)
        self.how = how


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during ``run``: stop submitting, let paid jobs land, exit 130/143."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def wait(rt: Runtime, batch: str, own: EmbeddedRedis | None = None) -> snapshot.Snapshot:
    """Block until the batch is finalized, showing progress the way the output can take it.
    ``own``: the embedded Redis this run started, whose end is noticed at once."""
    display = Display(out_console, rt.settings.progress_interval_s)
    lost_since: float | None = None
    with display:
        while True:
            if own is not None and (how := own.gone()):
                raise OwnRedisGone(how)
            try:
                snap = status.from_redis(rt.state, batch)
                lost_since = None
            except Unavailable:
                if own is not None and (how := own.gone()):
                    raise OwnRedisGone(how) from None
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > rt.settings.redis_outage_s:
                    raise RedisLost(time.monotonic() - lost_since) from None
                time.sleep(1.0)
                continue
            if snap is None:
                raise ImagebatchError(
                    f"batch {batch} vanished from Redis (was it flushed?); "
                    "run the same command again to resume"
                )
            display.update(snap)
            if snap.finished:
                return snap
            time.sleep(FOLLOW_S)


def follow(
    rt: Runtime, batch: str, out: str, owner: str | None, own: EmbeddedRedis | None = None
) -> snapshot.Snapshot:
    """Wait for the batch as its user watches: Ctrl-C lands it when this process owns its
    run (``owner``), else only stops following it; a Redis gone for too long (or this run's
    own embedded Redis gone at all) stops the command with the one that resumes it."""
    try:
        with interruptible():
            return wait(rt, batch, own)
    except Interrupted as stop:
        if owner is not None and control.interrupt(rt, batch, owner):
            land(rt, batch, out, stop.code)
        notice(
            f"stopped following batch {batch}; it goes on, run by the process that started it "
            f"(`imagebatch status {batch} --watch` follows it, `imagebatch cancel {batch}` "
            "stops it)",
            event="unfollowed",
        )
        sys.exit(stop.code)
    except OwnRedisGone as gone:
        raise ConfigError(
            f"the embedded Redis this run started has stopped ({gone.how}); the images and "
            f"rows stored so far are kept: resume with: {resume_command(sys.argv, batch, out)}"
        ) from None
    except RedisLost as lost:
        which = "the embedded Redis" if own is not None else "Redis (IMAGEBATCH_BROKER_URL)"
        raise ConfigError(
            f"{which} has not answered for {lost.seconds:.0f}s (IMAGEBATCH_REDIS_OUTAGE_S); "
            "nothing is lost: when it is back, resume with: "
            f"{resume_command(sys.argv, batch, out)}"
        ) from None


def resume_command(argv: list[str], batch: str, out: str) -> str:
    """The command that resumes the batch, as the user can type it: the same ``run`` or
    ``submit`` (with the batch id), or ``retry BATCH --out OUT`` (a manifest read from stdin
    is archived, and ``retry`` takes no --batch-id)."""
    words = argv[1:]
    if not words or words[0] not in ("run", "submit") or "-" in words:
        return shlex.join(["imagebatch", "retry", batch, "--out", out])
    if not any(word == "--batch-id" or word.startswith("--batch-id=") for word in words):
        words += ["--batch-id", batch]
    return shlex.join(["imagebatch", *words])


def land(rt: Runtime, batch: str, out: str, code: int) -> NoReturn:
    """After Ctrl-C of the run that owns the batch (it is interrupted now): no new submits;
    wait (up to the grace period) for paid jobs to land."""
    grace = rt.settings.interrupt_grace_s
    notice(
        f"interrupted: no new submits; waiting up to {grace:.0f}s for paid jobs to land "
        "(Ctrl-C again to stop now)",
        event="interrupted",
    )
    deadline = time.monotonic() + grace
    try:
        while time.monotonic() < deadline and control.in_flight(rt, batch):
            time.sleep(0.5)
        # A task writes its counts just after its last line lands: let it, so that the flush
        # saves them for the run that resumes (the summary adds up what every run paid for).
        time.sleep(SETTLE_S)
        finish.flush(rt, batch)
    except KeyboardInterrupt:
        pass
    left = len(control.in_flight(rt, batch))
    note = f" ({left} jobs in flight will be picked up again)" if left else ""
    jobs = control.open_jobs(rt, batch)
    if jobs:
        notice(
            f"still running at the provider, paid as they finish: {', '.join(jobs)}; "
            "the same command picks them up and stores what they made",
            event="jobs_running",
            jobs=jobs,
        )
    command = resume_command(sys.argv, batch, out)
    notice(f"stopped{note}; resume with: {command}", event="stopped", resume=command)
    sys.exit(code)


@contextmanager
def interruptible() -> Iterator[None]:
    def on_term(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(143)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    except KeyboardInterrupt:
        raise Interrupted(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
