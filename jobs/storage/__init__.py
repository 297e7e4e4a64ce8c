"""Where images and results go: an S3 bucket (any S3-compatible server) or a local directory.

Images are written with ``put_new``: never overwritten, never visible half-written, and checked
end to end (S3 verifies ``x-amz-checksum-sha256``; ``If-None-Match: *`` refuses a second write).
Writing the same bytes again is a success, so a redelivered task is harmless (reliability I3).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from jobs.errors import ConfigError, StorageError
from jobs.settings import Settings
from jobs.storage.base import CHUNK, Store
from jobs.storage.local import LocalStore

BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "InvalidSecurity",
    "AuthorizationHeaderMalformed",
}
DENIED = {"AccessDenied", "AllAccessDisabled"}

__all__ = ["CHUNK", "LocalStore", "Store", "absolute_out", "check_writable", "is_s3", "open_store"]


def is_s3(uri: str) -> bool:
    """``s3://…`` in any case (``S3://bucket/key`` too): the one place the scheme is judged."""
    return uri[:5].lower() == "s3://"


def absolute_out(out: str) -> str:
    """``--out`` as stored in the batch: an ``s3://`` URI, or an absolute directory, so every
    worker writes to the same place whatever its working directory."""
    if is_s3(out):
        return out
    return str(Path(out).expanduser().resolve())


def open_store(out: str, settings: Settings) -> Store:
    """``s3://bucket[/prefix]`` is S3 (``settings.s3_endpoint_url`` for MinIO/SeaweedFS...);
    anything else is a local directory."""
    if is_s3(out):
        from jobs.storage.s3 import S3Store

        return S3Store(out, settings)
    return LocalStore(out)


def check_writable(store: Store, out: str, batch: str) -> None:
    """The output location exists and takes a write (bucket, credentials, permissions), before
    anything is spent; else a ``ConfigError`` that names what to fix."""
    try:
        store.put(f"{batch}/.state/write-check", b"ok\n", "text/plain")
    except StorageError as exc:
        raise ConfigError(
            f"cannot write to the output {out}: {exc.message}; {_store_hint(out, exc)}"
        ) from None


def _store_hint(out: str, exc: StorageError) -> str:
    """What to fix, from what the store said (the boto error behind the StorageError)."""
    if not is_s3(out):
        return "choose a directory you can write with --out or IMAGEBATCH_OUT"
    from botocore.exceptions import ClientError, ConnectTimeoutError, EndpointConnectionError

    cause = exc.__cause__
    code = ""
    if isinstance(cause, ClientError):
        code = str(cause.response.get("Error", {}).get("Code", ""))
    bucket = urlsplit(out).netloc
    if code == "NoSuchBucket":
        return f"create the bucket {bucket}, or fix the bucket in --out or IMAGEBATCH_OUT"
    if code in BAD_CREDENTIALS:
        return (
            "the credentials were refused: fix AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
            "(or AWS_PROFILE)"
        )
    if code in DENIED:
        return f"these credentials may not write to {bucket}: grant s3:PutObject, or fix --out"
    if isinstance(cause, EndpointConnectionError | ConnectTimeoutError):
        return "start the S3 server, or fix IMAGEBATCH_S3_ENDPOINT_URL"
    return (
        "check the bucket in --out/IMAGEBATCH_OUT, IMAGEBATCH_S3_ENDPOINT_URL and the AWS "
        "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
    )
