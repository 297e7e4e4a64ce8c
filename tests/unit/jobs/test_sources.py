"""Reading a manifest from ``s3://``: against the suite's real S3 (SeaweedFS), every way it can
fail ends in one ``ConfigError`` line that names what is wrong and the setting to fix, and
never carries a secret or a traceback."""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from jobs.errors import ConfigError
from jobs.manifest.sources import read_chunks
from jobs.settings import Settings
from tests.servers import S3Server, free_port

MANIFEST = b"".join(
    json.dumps({"id": f"line-{i}", "prompt": f"a paper boat number {i}"}).encode() + b"\n"
    for i in range(60_000)
)
"""About 3 MB: several read chunks, so a break can come in the middle of the body."""


def settings() -> Settings:
    return Settings(_env_file=None)  # type: ignore[call-arg]


def config_error(source: str, *secrets: str) -> str:
    """The message of the ConfigError reading ``source`` ends in; one line, no secret."""
    with pytest.raises(ConfigError) as caught:
        b"".join(read_chunks(source, settings()))
    message = caught.value.message
    assert "\n" not in message and message.isprintable(), message
    for secret in secrets:
        assert secret not in message
    return message


@pytest.fixture
def manifest(aws_env: S3Server, s3_bucket: str) -> str:
    aws_env.client.put_object(Bucket=s3_bucket, Key="in/m.jsonl", Body=MANIFEST)
    return f"s3://{s3_bucket}/in/m.jsonl"


def test_a_manifest_in_s3_is_read_whole(manifest: str) -> None:
    assert b"".join(read_chunks(manifest, settings())) == MANIFEST


def test_an_s3_uri_in_capitals_is_read_from_s3_like_the_output_location(
    aws_env: S3Server, s3_bucket: str
) -> None:
    # Given a manifest in S3 and its URI written S3:// (as --out accepts it)
    aws_env.client.put_object(Bucket=s3_bucket, Key="in/Upper.jsonl", Body=MANIFEST)
    # Then it is read from S3, not looked for as a local path
    assert b"".join(read_chunks(f"S3://{s3_bucket}/in/Upper.jsonl", settings())) == MANIFEST


def test_a_missing_key_says_the_manifest_does_not_exist(aws_env: S3Server, s3_bucket: str) -> None:
    message = config_error(f"s3://{s3_bucket}/nope.jsonl", aws_env.secret_key)
    assert message == f"manifest s3://{s3_bucket}/nope.jsonl does not exist"


def test_a_missing_bucket_names_the_bucket_and_the_endpoint(aws_env: S3Server) -> None:
    bucket = f"no-such-bucket-{uuid.uuid4().hex[:8]}"
    message = config_error(f"s3://{bucket}/m.jsonl", aws_env.secret_key)
    assert f"bucket '{bucket}' does not exist" in message
    assert aws_env.endpoint_url in message and "IMAGEBATCH_S3_ENDPOINT_URL" in message


def test_access_denied_names_the_credentials_to_fix(
    aws_env: S3Server, s3_bucket: str, manifest: str
) -> None:
    deny = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{s3_bucket}/*",
            }
        ],
    }
    aws_env.client.put_bucket_policy(Bucket=s3_bucket, Policy=json.dumps(deny))
    message = config_error(manifest, aws_env.secret_key, aws_env.access_key)
    assert message.startswith(f"access denied reading manifest {manifest}"), message
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_PROFILE" in message
    assert f"'{s3_bucket}'" in message


@pytest.mark.parametrize("wrong", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID"])
def test_wrong_credentials_say_which_settings_to_fix_and_never_echo_them(
    manifest: str, monkeypatch: pytest.MonkeyPatch, aws_env: S3Server, wrong: str
) -> None:
    bad = "AKWRONG" + uuid.uuid4().hex[:12].upper()
    monkeypatch.setenv(wrong, bad)
    message = config_error(manifest, bad, aws_env.secret_key)
    assert message.startswith(f"S3 refused the AWS credentials reading manifest {manifest}")
    assert "AWS_ACCESS_KEY_ID" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert "AWS_PROFILE" in message


def test_no_credentials_at_all_says_how_to_give_them(
    manifest: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    message = config_error(manifest)
    assert message == (
        f"no AWS credentials to read manifest {manifest}: set AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    )


def test_an_unknown_aws_profile_is_named(
    manifest: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    message = config_error(manifest)
    assert "AWS_PROFILE" in message and "'no-such-profile'" in message


def test_an_unreachable_endpoint_names_the_setting_quickly(
    aws_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("IMAGEBATCH_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # boto's own retries would only slow this down
    started = time.monotonic()
    message = config_error("s3://any-bucket/m.jsonl", aws_env.secret_key)
    assert time.monotonic() - started < 10
    assert message == (
        f"cannot reach S3 at {endpoint} to read manifest s3://any-bucket/m.jsonl: "
        "check IMAGEBATCH_S3_ENDPOINT_URL"
    )


def test_a_password_in_the_endpoint_url_is_not_repeated(
    aws_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setenv("IMAGEBATCH_S3_ENDPOINT_URL", f"http://user:hunter2pass@127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    message = config_error("s3://any-bucket/m.jsonl", "hunter2pass")
    assert f"http://127.0.0.1:{port}" in message


@pytest.mark.parametrize("source", ["s3://", "s3:///m.jsonl", "s3://bucket", "s3://bucket/"])
def test_an_s3_uri_without_bucket_or_key_is_refused(aws_env: S3Server, source: str) -> None:
    assert config_error(source) == (
        f"manifest {source} is not a usable S3 location: expected s3://bucket/key"
    )


def test_an_invalid_bucket_name_is_refused(aws_env: S3Server) -> None:
    message = config_error("s3://Bad_Bucket!/m.jsonl")
    assert "'Bad_Bucket!' is not a valid S3 bucket name" in message


class BreakingRelay:
    """A TCP relay to the real S3 that cuts each connection after ``limit`` answer bytes:
    with a reset (RST), or by closing early, as a dying load balancer would."""

    def __init__(self, upstream: str, limit: int, *, reset: bool) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.limit = limit
        self.reset = reset
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.serve, daemon=True)]
        self.threads[0].start()

    def serve(self) -> None:
        while not self.stopping.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            thread = threading.Thread(target=self.relay, args=(client,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        forward = threading.Thread(target=self.pump, args=(client, upstream), daemon=True)
        forward.start()
        sent = 0
        try:
            while sent < self.limit:
                data = upstream.recv(min(65536, self.limit - sent))
                if not data:
                    break
                client.sendall(data)
                sent += len(data)
        finally:
            client.shutdown(socket.SHUT_RD)  # wakes the forwarding thread's recv
            forward.join(timeout=5)
            if self.reset:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                client.shutdown(socket.SHUT_WR)
            client.close()
            upstream.close()

    @staticmethod
    def pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=5)
        self.listener.close()


@pytest.fixture(params=[True, False], ids=["reset", "closed-early"])
def breaking_relay(aws_env: S3Server, request: pytest.FixtureRequest) -> Iterator[BreakingRelay]:
    relay = BreakingRelay(aws_env.endpoint_url, 256 * 1024, reset=request.param)
    try:
        yield relay
    finally:
        relay.close()


def test_a_connection_broken_while_streaming_the_body_is_one_clear_error(
    manifest: str, breaking_relay: BreakingRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMAGEBATCH_S3_ENDPOINT_URL", breaking_relay.url)
    message = config_error(manifest)
    assert message.startswith(f"the connection to S3 broke while reading manifest {manifest}")
    assert "run the command again" in message
