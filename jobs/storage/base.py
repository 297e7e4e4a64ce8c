"""The output-store interface and the key rules every backend shares."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from jobs.errors import StorageError

CHUNK = 1024 * 1024


class Store(Protocol):
    """One output location; keys are relative to it and always use '/'."""

    root: str

    def uri(self, key: str) -> str: ...

    def put_new(self, key: str, data: bytes, content_type: str, sha256_hex: str) -> None: ...

    def copy_new(self, source: str, key: str, sha256_hex: str, size: int) -> None:
        """Copy the object ``source`` to the new ``key`` in this store without passing its
        bytes through this process (S3: a server-side copy; a directory: a hard link), checked
        against the sha256 (S3) or size (a directory) it was stored with. Like ``put_new`` it
        never overwrites: the same bytes already at ``key`` are a success, others
        ``ObjectExists``; a missing ``source`` is a ``StorageError`` not worth a retry."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key`` (nothing if it is not there). Only for taking back what this
        process just wrote: images are never replaced."""
        ...

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def put_file(self, key: str, path: str, content_type: str) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def get_range(self, key: str, start: int, end: int) -> bytes | None:
        """Bytes ``start`` to ``end`` (exclusive) of the object; fewer at its end."""
        ...

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        """The object's bytes in chunks (bounded memory); nothing if it does not exist."""
        ...

    def sha256_of(self, key: str) -> str | None: ...

    def list_keys(self, prefix: str) -> Iterator[str]: ...

    def list_children(self, prefix: str) -> Iterator[str]:
        """Names directly under ``prefix`` that hold keys (like ``ls``), e.g. batch ids."""
        ...


def check_key(key: str) -> str:
    """Keys come from our own code; a malformed one is a bug, refused before touching storage."""
    parts = key.split("/")
    if not key or "\\" in key or "\0" in key or any(p in ("", ".", "..") for p in parts):
        raise invalid(f"invalid storage key {key!r}")
    return key


def check_prefix(prefix: str) -> str:
    """A listing prefix: a key, or a key's beginning (it may end with '/' or be empty)."""
    if prefix:
        check_key(prefix.removesuffix("/"))
    return prefix


def invalid(message: str) -> StorageError:
    """A request that can never succeed as asked: not worth a retry."""
    error = StorageError(message)
    error.retryable = False
    return error


def check_digest(data: bytes, sha256_hex: str, where: str) -> None:
    if hashlib.sha256(data).hexdigest() != sha256_hex.lower():
        raise StorageError(f"refusing to write {where}: the bytes do not match their sha256")


def os_error(exc: OSError, path: Path) -> StorageError:
    return StorageError(f"writing or reading {path} failed: {exc.strerror or exc}")
