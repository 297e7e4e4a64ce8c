"""Read a manifest from a local path, ``-`` (stdin) or ``s3://bucket/key``, in chunks."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from urllib.parse import urlsplit

import boto3

from jobs.errors import ConfigError
from jobs.settings import Settings

CHUNK = 1024 * 1024


def read_chunks(source: str, settings: Settings) -> Iterator[bytes]:
    if source == "-":
        while chunk := sys.stdin.buffer.read(CHUNK):
            yield chunk
        return
    if source.startswith("s3://"):
        parts = urlsplit(source)
        client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url)
        try:
            body = client.get_object(Bucket=parts.netloc, Key=parts.path.lstrip("/"))["Body"]
        except client.exceptions.NoSuchKey:
            raise ConfigError(f"manifest {source} does not exist") from None
        yield from body.iter_chunks(CHUNK)
        return
    try:
        handle = open(source, "rb")  # noqa: SIM115 - closed by the with below, after the check
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {source}: {exc.strerror}") from None
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk
