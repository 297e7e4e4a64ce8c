"""OpenAI's Files and Batch APIs over HTTP: upload a JSONL file, create a batch, poll, read results.

``POST /v1/batches`` takes no idempotency key, so ``create`` is never retried here: when its
answer is lost it raises ``AmbiguousSubmit``, and the caller must look for the batch with
``find`` (by the metadata it sent) before it creates another, or the images are bought twice.
Files are streamed both ways: an input file may be 200 MB, an output file of base64 images more.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Self

import httpx

from jobs.errors import AmbiguousSubmit, TransientProviderError
from jobs.providers.http import NOT_SENT, check, json_object, make_client, send
from jobs.providers.openai_batch_objects import IMAGES_ENDPOINT, BatchInfo
from jobs.settings import ProviderConfig

COMPLETION_WINDOW = "24h"
"""The only window OpenAI offers."""
PAGE_SIZE = 100
CHUNK = 1024 * 1024
MAX_METADATA = 16


class OpenAIBatchAPI:
    """A synchronous client of OpenAI's Files and Batch APIs; failures raise ``jobs.errors``.

    Nothing is retried here: the caller's retry policy decides, knowing that ``create`` must
    be followed by ``find``, never by another ``create``, after an ``AmbiguousSubmit``.
    """

    def __init__(self, config: ProviderConfig, client: httpx.Client | None = None) -> None:
        self.name = config.name
        self.base_url = config.base_url.rstrip("/")
        self.client = client or make_client(config)
        key = config.api_key.get_secret_value() if config.api_key else ""
        self._auth = {"Authorization": f"Bearer {key}"}

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def upload(
        self, name: str, chunks: Iterable[bytes] | os.PathLike[str], size: int | None = None
    ) -> str:
        """Upload a batch input file (``purpose=batch``) and return its file id.

        Args:
            name: the file name OpenAI records; it must end in ``.jsonl``.
            chunks: a path, read 1 MiB at a time, or an iterator of byte chunks; never whole.
            size: the total bytes ``chunks`` yields (required for an iterator).

        Raises:
            ValueError: ``size`` is missing, or the chunks do not add up to it.
        """
        if isinstance(chunks, os.PathLike):
            with open(chunks, "rb") as source:
                pieces = iter(lambda: source.read(CHUNK), b"")
                return self._upload(name, pieces, os.fstat(source.fileno()).st_size)
        if size is None:
            raise ValueError("upload needs the size of an iterator of chunks")
        return self._upload(name, chunks, size)

    def _upload(self, name: str, chunks: Iterable[bytes], size: int) -> str:
        boundary = uuid.uuid4().hex
        safe = name.replace('"', "'").replace("\r", " ").replace("\n", " ")
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{safe}"'
            "\r\nContent-Type: application/jsonl\r\n\r\n"
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        headers = self._auth | {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + size + len(tail)),
        }
        body = _framed(head, chunks, size, tail)
        response = send(
            self.client, "POST", f"{self.base_url}/v1/files", content=body, headers=headers
        )
        check(response, self.name)
        file_id = json_object(response, self.name).get("id")
        if not isinstance(file_id, str):
            raise TransientProviderError(
                f"{self.name} answered an upload without a file id", type="malformed_response"
            )
        return file_id

    def create(
        self,
        file_id: str,
        endpoint: str = IMAGES_ENDPOINT,
        metadata: Mapping[str, str] | None = None,
    ) -> BatchInfo:
        """Create a batch of the uploaded file. Never retried: there is no idempotency key.

        Raises:
            AmbiguousSubmit: the answer was lost (or was a 5xx or garbage): the batch may exist;
                ``find`` it by ``metadata`` before creating another.
        """
        payload: dict[str, Any] = {
            "input_file_id": file_id,
            "endpoint": endpoint,
            "completion_window": COMPLETION_WINDOW,
        }
        if metadata:
            _check_metadata(metadata)
            payload["metadata"] = dict(metadata)
        url = f"{self.base_url}/v1/batches"
        response = send(self.client, "POST", url, submit=True, json=payload, headers=self._auth)
        if response.status_code >= 500:
            raise AmbiguousSubmit(
                f"{self.name} answered {response.status_code} to a batch create: the batch may"
                " exist; find it before creating another",
                status=response.status_code,
            )
        check(response, self.name, submit=True)
        return self._info(json_object(response, self.name, submit=True), submit=True)

    def find(
        self, metadata: Mapping[str, str], created_after: float | None = None
    ) -> BatchInfo | None:
        """The newest batch whose metadata holds every pair of ``metadata``, or None.

        Lists batches newest first, page by page; ``created_after`` (Unix seconds) stops the
        search at batches created before that second, so an old account is not read whole.
        """
        floor = None if created_after is None else math.floor(created_after)
        after: str | None = None
        while True:
            params: dict[str, str | int] = {"limit": PAGE_SIZE}
            if after is not None:
                params["after"] = after
            url = f"{self.base_url}/v1/batches"
            response = send(self.client, "GET", url, params=params, headers=self._auth)
            check(response, self.name)
            page = json_object(response, self.name)
            data = page.get("data")
            if not isinstance(data, list):
                raise TransientProviderError(
                    f"{self.name} listed batches without data", type="malformed_response"
                )
            for item in data:
                info = self._info(item)
                if floor is not None and info.created_at < floor:
                    return None
                if all(info.metadata.get(k) == v for k, v in metadata.items()):
                    return info
            last = page.get("last_id")
            after = last if isinstance(last, str) else None
            if not page.get("has_more") or after is None or not data:
                return None

    def get(self, batch_id: str) -> BatchInfo:
        url = f"{self.base_url}/v1/batches/{batch_id}"
        response = send(self.client, "GET", url, headers=self._auth)
        check(response, self.name)
        return self._info(json_object(response, self.name))

    def cancel(self, batch_id: str) -> BatchInfo:
        """Ask for a cancel; the batch goes ``cancelling``, then ``cancelled``. Safe to repeat."""
        url = f"{self.base_url}/v1/batches/{batch_id}/cancel"
        response = send(self.client, "POST", url, headers=self._auth)
        check(response, self.name)
        return self._info(json_object(response, self.name))

    def lines(self, file_id: str) -> Iterator[dict[str, Any]]:
        """Each JSONL line of a file, parsed, as it arrives: memory holds one line, not the file.

        Raises:
            TransientProviderError: the connection broke, or a line is not a JSON object;
                reading the file again from the start is safe.
        """
        url = f"{self.base_url}/v1/files/{file_id}/content"
        request = self.client.build_request("GET", url, headers=self._auth)
        try:
            response = self.client.send(request, stream=True)
        except NOT_SENT as exc:
            raise TransientProviderError(f"cannot reach provider: {type(exc).__name__}") from None
        except httpx.TransportError as exc:
            raise TransientProviderError(
                f"provider connection failed: {type(exc).__name__}"
            ) from None
        try:
            if response.status_code >= 400:
                response.read()
                check(response, self.name)
            for raw in _split(response.iter_bytes()):
                if raw.strip():
                    yield _parse_line(raw, self.name, file_id)
        except httpx.TransportError as exc:
            raise TransientProviderError(
                f"{self.name}: reading file {file_id} broke off ({type(exc).__name__})"
            ) from None
        finally:
            response.close()

    def _info(self, body: Any, *, submit: bool = False) -> BatchInfo:
        try:
            if not isinstance(body, Mapping):
                raise ValueError("not an object")
            return BatchInfo.from_api(body)
        except (ValueError, TypeError, AttributeError) as exc:
            message = f"{self.name} sent a malformed batch object: {exc}"
            if submit:
                raise AmbiguousSubmit(message, type="malformed_response") from None
            raise TransientProviderError(message, type="malformed_response") from None


def _check_metadata(metadata: Mapping[str, str]) -> None:
    """OpenAI's limits, checked before a create rather than learned from a refusal."""
    if len(metadata) > MAX_METADATA:
        raise ValueError(f"batch metadata takes at most {MAX_METADATA} pairs")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError("batch metadata keys and values must be strings")
        if len(key) > 64 or len(value) > 512:
            raise ValueError(f"batch metadata {key[:64]!r}: keys <= 64 chars, values <= 512")


def _framed(head: bytes, chunks: Iterable[bytes], size: int, tail: bytes) -> Iterator[bytes]:
    """The multipart body, streamed; a source that yields other than ``size`` bytes is an error."""
    yield head
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        if sent > size:
            raise ValueError(f"the upload yielded more than the {size} bytes announced")
        yield chunk
    if sent != size:
        raise ValueError(f"the upload yielded {sent} bytes, not the {size} announced")
    yield tail


def _split(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Lines of a byte stream; only the newly arrived bytes are searched, so a long line is
    not scanned again for every chunk."""
    buffer = bytearray()
    for chunk in chunks:
        scan = len(buffer)
        buffer += chunk
        start = 0
        while (end := buffer.find(b"\n", scan)) != -1:
            yield bytes(buffer[start:end])
            start = scan = end + 1
        if start:
            del buffer[:start]
    if buffer:
        yield bytes(buffer)


def _parse_line(raw: bytes, provider: str, file_id: str) -> dict[str, Any]:
    try:
        item = json.loads(raw)
    except ValueError:
        item = None
    if not isinstance(item, dict):
        raise TransientProviderError(
            f"{provider}: file {file_id} has a line that is not a JSON object",
            type="malformed_response",
        )
    return item
