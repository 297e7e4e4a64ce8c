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


def default_batch_id(source: str, sha256: str, provider: str, *, fresh: bool = False) -> str:
    """The manifest's name and a digest of its content and of what decides what is bought
    (the provider, ``--fresh``): the same command resumes the batch, while the same manifest
    on another provider is another batch (its stored lines were bought from someone else)."""
    decided = f"{sha256}\n{provider}" + ("\nfresh" if fresh else "")
    return f"{_stem(source)}-{hashlib.sha256(decided.encode()).hexdigest()[:8]}"


def legacy_batch_id(source: str, sha256: str) -> str:
    """The default id before it held the provider: a batch started under it is resumed (by
    the same provider) rather than bought again under the new one."""
    return f"{_stem(source)}-{sha256[:8]}"


def _stem(source: str) -> str:
    name = "stdin" if source in ("-", "") else PurePosixPath(source.split("?")[0]).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")[:60] or "batch"
