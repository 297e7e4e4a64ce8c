"""A manifest copied to a local temp file as it is read (from a path, stdin or S3): validated
from there, archived from there, and named by its content's digest."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Spooled:
    path: str
    sha256: str


def spool(chunks: Iterable[bytes]) -> Spooled:
    """Copy the manifest to a local temp file (read twice, archived after); removed again if
    reading the source fails part way."""
    digest = hashlib.sha256()
    fd, path = tempfile.mkstemp(prefix="imagebatch-manifest-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
    except BaseException:
        os.unlink(path)
        raise
    return Spooled(path, digest.hexdigest())


def file_chunks(path: str) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def default_batch_id(source: str, sha256: str) -> str:
    """The manifest's name and a digest of its content: the same command resumes the batch."""
    name = "stdin" if source in ("-", "") else PurePosixPath(source.split("?")[0]).stem
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "batch"
    return f"{stem[:60]}-{sha256[:8]}"
