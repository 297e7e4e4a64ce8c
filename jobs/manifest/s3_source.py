"""Read a manifest from ``s3://bucket/key``, in chunks.

Whatever goes wrong (the bucket, the credentials, the endpoint, or the connection while the
body streams) ends in one ``ConfigError`` line that says what is wrong and which setting
fixes it, before anything is submitted. S3's own messages are not repeated: some echo
signing details, and none say which imagebatch setting is at fault.
"""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import urlsplit

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    IncompleteReadError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
    ReadTimeoutError,
    ResponseStreamingError,
)
from urllib3.exceptions import HTTPError as URLLib3Error

from jobs.errors import ConfigError
from jobs.settings import Settings
from jobs.storage.s3 import s3_client
from jobs.text import shown

CHUNK = 1024 * 1024
S3_CONFIG = Config(retries={"mode": "standard"}, connect_timeout=10, read_timeout=60)
"""Retries stay boto's standard ones; ``AWS_MAX_ATTEMPTS`` still tunes how many."""

_MISSING_KEY = {"NoSuchKey", "NotFound", "404"}
_DENIED = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden"}
_BAD_CREDENTIALS = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
    "AuthorizationHeaderMalformed",
}
_CREDENTIALS = "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
_BROKEN = (
    ResponseStreamingError,
    IncompleteReadError,
    ReadTimeoutError,
    ConnectionClosedError,
    URLLib3Error,
    OSError,
)
"""What a body stream raises when the connection fails midway."""


def read_chunks(source: str, settings: Settings) -> Iterator[bytes]:
    parts = urlsplit(source)
    bucket, key = parts.netloc, parts.path.lstrip("/")
    uri = shown(source)
    if not bucket or not key:
        raise ConfigError(f"manifest {uri} is not a usable S3 location: expected s3://bucket/key")
    endpoint = _without_userinfo(settings.s3_endpoint_url)
    try:
        body = s3_client(settings, S3_CONFIG).get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as exc:
        raise _refused(exc, uri, bucket, endpoint) from None
    except BotoCoreError as exc:
        raise _unreadable(exc, uri, bucket, endpoint) from None
    read = 0
    try:
        for chunk in body.iter_chunks(CHUNK):
            read += len(chunk)
            yield chunk
    except _BROKEN as exc:
        raise ConfigError(
            f"the connection to S3 broke while reading manifest {uri} ({type(exc).__name__} "
            f"after {read:,} bytes): check the network and run the command again"
        ) from None
    finally:
        body.close()


def _refused(exc: ClientError, uri: str, bucket: str, endpoint: str | None) -> ConfigError:
    """S3 answered, and said no: which of our settings or names is at fault."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    where = f"at {endpoint} (IMAGEBATCH_S3_ENDPOINT_URL)" if endpoint else "in AWS"
    if code in _MISSING_KEY:
        return ConfigError(f"manifest {uri} does not exist")
    if code == "NoSuchBucket":
        return ConfigError(
            f"manifest {uri}: bucket '{shown(bucket)}' does not exist {where}: "
            "check the bucket name, or the endpoint"
        )
    if code in _BAD_CREDENTIALS:
        return ConfigError(
            f"S3 refused the AWS credentials reading manifest {uri} ({code}): check {_CREDENTIALS}"
        )
    if code in _DENIED or status == 403:
        return ConfigError(
            f"access denied reading manifest {uri}: the AWS credentials in use "
            f"({_CREDENTIALS}) may not read from bucket '{shown(bucket)}'"
        )
    return ConfigError(f"cannot read manifest {uri}: S3 {where} answered {code or status}")


def _unreadable(exc: BotoCoreError, uri: str, bucket: str, endpoint: str | None) -> ConfigError:
    """No answer from S3: credentials, endpoint or parameters are wrong before any request."""
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return ConfigError(f"no AWS credentials to read manifest {uri}: set {_CREDENTIALS}")
    if isinstance(exc, ProfileNotFound):
        profile = shown(exc.kwargs.get("profile", ""))
        return ConfigError(
            f"AWS_PROFILE names profile '{profile}', which is not in the AWS config files: "
            f"fix AWS_PROFILE to read manifest {uri}"
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError | ReadTimeoutError):
        if endpoint:
            return ConfigError(
                f"cannot reach S3 at {endpoint} to read manifest {uri}: "
                "check IMAGEBATCH_S3_ENDPOINT_URL"
            )
        return ConfigError(
            f"cannot reach AWS S3 to read manifest {uri}: check the network, or set "
            "IMAGEBATCH_S3_ENDPOINT_URL for an S3-compatible server"
        )
    if isinstance(exc, ParamValidationError):
        return ConfigError(f"manifest {uri}: '{shown(bucket)}' is not a valid S3 bucket name")
    return ConfigError(f"cannot read manifest {uri} from S3: {type(exc).__name__}")


def _without_userinfo(url: str | None) -> str | None:
    """The endpoint as messages may show it: any ``user:password@`` left out."""
    if not url:
        return None
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return shown(url)
    return shown(parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl())
