"""Where images and results go: an S3 bucket (any S3-compatible server) or a local directory.

Images are written with ``put_new``: never overwritten, never visible half-written, and
checked end to end (S3 verifies ``x-amz-checksum-sha256``; ``If-None-Match: *`` refuses a
second write). Writing the same bytes again is a success, so a redelivered task is harmless.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from jobs.errors import ObjectExists, StorageError
from jobs.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class Store(Protocol):
    """One output location; keys are relative to it and always use '/'."""

    root: str

    def uri(self, key: str) -> str: ...

    def put_new(self, key: str, data: bytes, content_type: str, sha256_hex: str) -> None: ...

    def put(self, key: str, data: bytes, content_type: str) -> None: ...

    def put_file(self, key: str, path: str, content_type: str) -> None: ...

    def get(self, key: str) -> bytes | None: ...

    def sha256_of(self, key: str) -> str | None: ...

    def list_keys(self, prefix: str) -> Iterator[str]: ...


def open_store(out: str, settings: Settings) -> Store:
    """``s3://bucket[/prefix]`` → S3, anything else → a local directory."""
    if out.startswith("s3://"):
        return S3Store(out, settings)
    return LocalStore(out)


class LocalStore:
    """A directory; ``os.link`` publishes a finished temp file only if the name is free."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.base = Path(root).resolve()

    def uri(self, key: str) -> str:
        return str(self.base / key)

    def _path(self, key: str) -> Path:
        path = (self.base / key).resolve()
        if self.base not in path.parents:
            raise StorageError(f"key {key!r} escapes the output directory")
        return path

    def _temp(self, path: Path, data: bytes) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        return temp

    def put_new(self, key: str, data: bytes, content_type: str, sha256_hex: str) -> None:
        path = self._path(key)
        temp = self._temp(path, data)
        try:
            os.link(temp, path)
        except FileExistsError:
            if self.sha256_of(key) != sha256_hex:
                raise ObjectExists(f"{self.uri(key)} exists with other bytes") from None
        finally:
            os.unlink(temp)

    def put(self, key: str, data: bytes, content_type: str) -> None:
        path = self._path(key)
        Path(self._temp(path, data)).replace(path)

    def put_file(self, key: str, path: str, content_type: str) -> None:
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        with os.fdopen(handle, "wb") as out, open(path, "rb") as source:
            while chunk := source.read(1024 * 1024):
                out.write(chunk)
        Path(temp).replace(target)

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def sha256_of(self, key: str) -> str | None:
        digest = hashlib.sha256()
        try:
            with open(self._path(key), "rb") as source:
                while chunk := source.read(1024 * 1024):
                    digest.update(chunk)
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    def list_keys(self, prefix: str) -> Iterator[str]:
        start = self.base / prefix
        folder = start if prefix.endswith("/") else start.parent
        if not folder.is_dir():
            return
        for path in sorted(folder.rglob("*")):
            key = path.relative_to(self.base).as_posix()
            if path.is_file() and key.startswith(prefix) and not path.name.startswith(".part-"):
                yield key


class S3Store:
    """A bucket and prefix. One boto3 client, shared by every worker thread (it is safe)."""

    def __init__(self, root: str, settings: Settings) -> None:
        parts = urlsplit(root)
        if not parts.netloc:
            raise StorageError(f"{root!r}: expected s3://bucket[/prefix]")
        self.root = root.rstrip("/")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        config = Config(
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
            max_pool_connections=64,
            request_checksum_calculation="when_required",
        )
        self.client: S3Client = boto3.session.Session().client(
            "s3", endpoint_url=settings.s3_endpoint_url, config=config
        )

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_new(self, key: str, data: bytes, content_type: str, sha256_hex: str) -> None:
        checksum = base64.b64encode(bytes.fromhex(sha256_hex)).decode()
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ContentType=content_type,
                ChecksumSHA256=checksum,
                IfNoneMatch="*",
                Metadata={"sha256": sha256_hex},
            )
        except ClientError as exc:
            if _code(exc) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                if self.sha256_of(key) != sha256_hex:
                    raise ObjectExists(f"{self.uri(key)} exists with other bytes") from None
                return
            raise _storage_error(exc, self.uri(key)) from None
        except BotoCoreError as exc:
            raise StorageError(f"writing {self.uri(key)} failed: {type(exc).__name__}") from None

    def put(self, key: str, data: bytes, content_type: str) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(exc, self.uri(key)) from None

    def put_file(self, key: str, path: str, content_type: str) -> None:
        try:
            self.client.upload_file(
                path, self.bucket, self._key(key), ExtraArgs={"ContentType": content_type}
            )
        except (ClientError, BotoCoreError) as exc:
            raise _storage_error(exc, self.uri(key)) from None

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise _storage_error(exc, self.uri(key)) from None
        except BotoCoreError as exc:
            raise _storage_error(exc, self.uri(key)) from None

    def sha256_of(self, key: str) -> str | None:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                return None
            raise _storage_error(exc, self.uri(key)) from None
        recorded = head.get("Metadata", {}).get("sha256")
        if recorded:
            return recorded
        data = self.get(key)
        return hashlib.sha256(data).hexdigest() if data is not None else None

    def list_keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
            for item in page.get("Contents", []):
                yield item["Key"][strip:]


def _code(exc: ClientError) -> str:
    error: Any = exc.response.get("Error", {})
    return str(error.get("Code", ""))


def _storage_error(exc: Exception, uri: str) -> StorageError:
    detail = _code(exc) if isinstance(exc, ClientError) else type(exc).__name__
    return StorageError(f"S3 request for {uri} failed: {detail}")
