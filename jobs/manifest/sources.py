"""Read a manifest from a local path, ``-`` (stdin) or ``s3://bucket/key``, in chunks; a
manifest that cannot be read ends in one ``ConfigError`` line naming what to fix, before
anything is submitted (S3's cases: ``s3_source``, imported only for an S3 manifest)."""

from __future__ import annotations

import sys
from collections.abc import Iterator

from jobs.errors import ConfigError
from jobs.settings import Settings
from jobs.storage import is_s3
from jobs.text import shown

CHUNK = 1024 * 1024


def read_chunks(source: str, settings: Settings) -> Iterator[bytes]:
    """The manifest's bytes, in chunks of at most ``CHUNK``.

    Raises:
        ConfigError: the manifest cannot be read; the message names the setting to fix.
    """
    if source == "-":
        while chunk := sys.stdin.buffer.read(CHUNK):
            yield chunk
        return
    if is_s3(source):
        from jobs.manifest import s3_source

        yield from s3_source.read_chunks(source, settings)
        return
    try:
        handle = open(source, "rb")  # noqa: SIM115 - closed by the with below, after the check
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {shown(source)}: {exc.strerror}") from None
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk
