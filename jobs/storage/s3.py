"""The S3 backend of ``jobs.storage``: a bucket and prefix on AWS or any S3-compatible server.

``put_new`` sends ``x-amz-checksum-sha256`` (S3 refuses a body that does not match) and
``If-None-Match: *`` (a second write of the key is refused; the same bytes again count as a
success). boto's errors become ``StorageError``s with S3's own code and message, never the
signing details it may echo back.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
)
from botocore.response import StreamingBody

from jobs.errors import ObjectExists, StorageError
from jobs.settings import Settings
from jobs.storage.base import CHUNK, check_key, check_prefix, invalid, os_error

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


S3_CONFIG = Config(
    retries={"mode": "standard", "max_attempts": 5},
    connect_timeout=10,
    read_timeout=60,
    max_pool_connections=64,  # every worker thread shares one client
)

_MISSING = {"NoSuchKey", "NotFound", "404"}
_CONDITION_FAILED = {"PreconditionFailed", "412"}
_BAD_CHECKSUM = {"BadDigest", "InvalidDigest", "XAmzContentSHA256Mismatch"}
"""The body does not match its checksum (so does InvalidRequest when it mentions a checksum)."""
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout"}
_TRANSIENT = {*_THROTTLED, "RequestTimeTooSkewed", "ConditionalRequestConflict", "OperationAborted"}


def s3_client(settings: Settings, config: Config = S3_CONFIG) -> S3Client:
    """A client on ``IMAGEBATCH_S3_ENDPOINT_URL`` (or AWS), credentials from the AWS chain.

    A fresh session each time: sessions are not thread-safe (the client made from one is), and
    the default session would keep the credentials it first found."""
    if settings.s3_endpoint_url:
        # S3-compatible servers (MinIO, SeaweedFS) rarely do virtual-hosted buckets.
        config = config.merge(Config(s3={"addressing_style": "path"}))
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.s3_endpoint_url, config=config
    )


class S3Store:
    """A bucket and prefix. One boto3 client per store, shared by every worker thread."""

    def __init__(self, root: str, settings: Settings) -> None:
        parts = urlsplit(root)
        if parts.scheme.lower() != "s3" or not parts.netloc:
            raise invalid(f"{root!r} is not an S3 location: expected s3://bucket[/prefix]")
        self.root = root
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.client = s3_client(settings)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def put_new(self, key: str, data: bytes, content_type: str, sha256_hex: str) -> None:
        sha256_hex = sha256_hex.lower()
        if not re.fullmatch(r"[0-9a-f]{64}", sha256_hex):
            raise invalid(f"refusing to write {self.uri(key)}: {sha256_hex!r} is no sha256")
        with _s3_errors("writing", self.uri(key)):
            try:
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Body=data,
                    ContentType=content_type,
                    ChecksumSHA256=base64.b64encode(bytes.fromhex(sha256_hex)).decode(),
                    IfNoneMatch="*",
                    Metadata={"sha256": sha256_hex},
                )
            except ClientError as exc:
                code = _code(exc)
                if code not in _CONDITION_FAILED and code != "ConditionalRequestConflict":
                    raise
                if self.sha256_of(key) == sha256_hex:
                    return  # the same bytes are already there: a redelivery, not a conflict
                if code in _CONDITION_FAILED:
                    raise ObjectExists(f"{self.uri(key)} already exists with other bytes") from None
                raise  # a concurrent write is still in flight: retry later

    def copy_new(self, source: str, key: str, sha256_hex: str, size: int) -> None:
        """A server-side copy (the bytes never leave S3) that S3 checksums as it writes; the
        object's own metadata (content type, recorded sha256) goes with it."""
        sha256_hex = sha256_hex.lower()
        with _s3_errors("copying to", self.uri(key)):
            try:
                answer = self.client.copy_object(
                    Bucket=self.bucket,
                    Key=self._key(key),
                    CopySource={"Bucket": self.bucket, "Key": self._key(source)},
                    ChecksumAlgorithm="SHA256",
                    IfNoneMatch="*",
                )
            except ClientError as exc:
                if _code(exc) not in _CONDITION_FAILED:
                    raise
                if self.sha256_of(key) == sha256_hex:
                    return
                raise ObjectExists(f"{self.uri(key)} already exists with other bytes") from None
        checksum = answer.get("CopyObjectResult", {}).get("ChecksumSHA256", "")
        try:
            copied = base64.b64decode(checksum, validate=True).hex() if checksum else None
        except (binascii.Error, ValueError):
            copied = None
        if (copied or self.sha256_of(key)) != sha256_hex:
            self.delete(key)
            raise StorageError(
                f"refusing to copy {self.uri(source)}: its bytes do not match their sha256"
            )

    def delete(self, key: str) -> None:
        with _s3_errors("deleting", self.uri(key)):
            self.client.delete_object(Bucket=self.bucket, Key=self._key(key))

    def put(self, key: str, data: bytes, content_type: str) -> None:
        with _s3_errors("writing", self.uri(key)):
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, ContentType=content_type
            )

    def put_file(self, key: str, path: str, content_type: str) -> None:
        """Streams from disk (multipart above 8 MiB); a failed upload is aborted, never shown."""
        with _s3_errors("writing", self.uri(key)):
            try:
                self.client.upload_file(
                    path, self.bucket, self._key(key), ExtraArgs={"ContentType": content_type}
                )
            except OSError as exc:
                raise os_error(exc, Path(path)) from exc

    def get(self, key: str) -> bytes | None:
        with _s3_errors("reading", self.uri(key)):
            body = self._open(key)
            if body is None:
                return None
            with contextlib.closing(body):
                return body.read()

    def get_range(self, key: str, start: int, end: int) -> bytes | None:
        if end <= start:
            return b""
        with _s3_errors("reading", self.uri(key)):
            try:
                body = self.client.get_object(
                    Bucket=self.bucket, Key=self._key(key), Range=f"bytes={start}-{end - 1}"
                )["Body"]
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return None
                if _code(exc) == "InvalidRange":
                    return b""
                raise
            with contextlib.closing(body):
                return body.read()

    def iter_chunks(self, key: str) -> Iterator[bytes]:
        with _s3_errors("reading", self.uri(key)):
            body = self._open(key)
            if body is None:
                return
            with contextlib.closing(body):
                yield from body.iter_chunks(CHUNK)

    def sha256_of(self, key: str) -> str | None:
        """The stored object's sha256: our metadata, else S3's full-object checksum, else hash."""
        with _s3_errors("reading", self.uri(key)):
            try:
                head = self.client.head_object(
                    Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED"
                )
            except ClientError as exc:
                if _code(exc) in _MISSING:
                    return None
                raise
            recorded = head.get("Metadata", {}).get("sha256", "")
            if re.fullmatch(r"[0-9a-f]{64}", recorded):
                return recorded
            checksum = head.get("ChecksumSHA256", "")
            # A multipart upload's checksum is composite ("...-3"): a hash of part hashes.
            full = head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT" and "-" not in checksum
            with contextlib.suppress(binascii.Error, ValueError):
                digest = base64.b64decode(checksum, validate=True)
                if full and len(digest) == 32:
                    return digest.hex()
            body = self._open(key)
            if body is None:
                return None
            hasher = hashlib.sha256()
            with contextlib.closing(body):
                while chunk := body.read(CHUNK):
                    hasher.update(chunk)
            return hasher.hexdigest()

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Keys relative to the store's prefix, page by page (in the server's order)."""
        strip = len(self.prefix) + 1 if self.prefix else 0
        full = f"{self.prefix}/{check_prefix(prefix)}" if self.prefix else check_prefix(prefix)
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_errors("listing", f"s3://{self.bucket}/{full}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full):
                for item in page.get("Contents", []):
                    yield item["Key"][strip:]

    def list_children(self, prefix: str) -> Iterator[str]:
        base = "/".join(p for p in (self.prefix, check_prefix(prefix).strip("/")) if p)
        full = f"{base}/" if base else ""
        paginator = self.client.get_paginator("list_objects_v2")
        with _s3_errors("listing", f"s3://{self.bucket}/{full}"):
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full, Delimiter="/"):
                for item in page.get("CommonPrefixes", []):
                    yield item["Prefix"][len(full) :].rstrip("/")

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _open(self, key: str) -> StreamingBody | None:
        """The object's body stream, or None if it does not exist (S3 errors pass through)."""
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        except ClientError as exc:
            if _code(exc) in _MISSING:
                return None
            raise


@contextlib.contextmanager
def _s3_errors(doing: str, uri: str) -> Iterator[None]:
    """Turn boto's exceptions into StorageError with a clear, secret-free message."""
    try:
        yield
    except ClientError as exc:
        raise _client_error(exc, doing, uri) from exc
    except BotoCoreError as exc:
        raise _boto_error(exc, doing, uri) from exc


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _client_error(exc: ClientError, doing: str, uri: str) -> StorageError:
    """Only the code, status and S3's own message: never the signing details S3 may echo back."""
    code = _code(exc)
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    message = str(exc.response.get("Error", {}).get("Message", "")).strip()
    bad_checksum = code in _BAD_CHECKSUM or (
        code == "InvalidRequest" and "checksum" in message.lower()
    )
    if bad_checksum:
        text = f"{doing} {uri} failed: S3 rejected the body's checksum ({code}: {message})"
    else:
        text = f"{doing} {uri} failed: {code or status} {message}".rstrip()
    error = StorageError(text)
    error.retryable = bad_checksum or status >= 500 or status == 429 or code in _TRANSIENT
    return error


def _boto_error(exc: BotoCoreError, doing: str, uri: str) -> StorageError:
    """Connection trouble is worth retrying; missing credentials or bad parameters are not."""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        hint = "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        return invalid(f"{doing} {uri} failed: no usable AWS credentials ({hint})")
    detail = re.sub(r"//[^/@\s]+@", "//", str(exc))  # drop user:password from any URL
    error = StorageError(f"{doing} {uri} failed: {type(exc).__name__}: {detail}")
    error.retryable = not isinstance(exc, ParamValidationError)
    return error
