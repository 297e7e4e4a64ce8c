"""OpenAI's Files API under ``/openai``, as the Batch API uses it: a batch's input file
uploaded (multipart, purpose ``batch``, ``.jsonl``, at most 200 MB), and its output and error
files, made line by line as they are read (``Files`` is the part of ``openai_batch.Batches``
that serves them)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from jobs.simulator.batch_requests import failure_line, success_line
from jobs.simulator.batch_timeline import Batch
from jobs.simulator.core import Request, Response, error_response, json_response
from jobs.simulator.multipart import parse_form
from jobs.simulator.state import State

PROVIDER = "openai"
UPLOAD_PATH = "/openai/v1/files"
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_UPLOAD = MAX_FILE_BYTES + 1024 * 1024
"""The largest upload body the server reads: a 200 MB file and its multipart framing."""


def invalid(message: str, param: str | None = None, code: str | None = None) -> Response:
    return error_response(PROVIDER, "invalid", message, code=code, param=param)


def no_such(kind: str, object_id: str) -> Response:
    return error_response(PROVIDER, "not_found", f"No such {kind} object: {object_id}", param="id")


def api_key(req: Request) -> str:
    return req.headers.get("authorization", "").partition(" ")[2]


@dataclass
class StoredFile:
    """An uploaded file (``data``), or a batch's output or error file (made when it is read)."""

    id: str
    api_key: str
    filename: str
    purpose: str
    created_at: int
    data: bytes | None = None
    size: int | None = None

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.size,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


class Files:
    """Uploaded files and batches' result files, per API key (a part of ``Batches``)."""

    state: State
    files: dict[str, StoredFile]
    batches: dict[str, Batch]
    results: dict[str, tuple[str, str]]
    """Output and error file id → (batch id, ``output`` or ``error``)."""

    def upload(self, req: Request) -> Response:
        form = parse_form(req.headers.get("content-type", ""), req.body)
        if form is None:
            return invalid("The body must be multipart/form-data with purpose and file.")
        if "purpose" not in form or "file" not in form or form["file"].filename is None:
            missing = "purpose" if "purpose" not in form else "file"
            message = f"Missing required parameter: '{missing}'."
            return invalid(message, missing, "missing_required_parameter")
        purpose, upload = form["purpose"].data.decode("utf-8", "replace"), form["file"]
        filename = upload.filename or ""
        if purpose != "batch":
            return invalid("The simulator stores files of purpose 'batch' only.", "purpose")
        if not filename.endswith(".jsonl"):
            return invalid("Invalid file format for Batch API. Must be .jsonl", "file")
        if len(upload.data) > MAX_FILE_BYTES:
            return invalid("File is too large.", "file")
        file_id, size = f"file-{uuid.uuid4().hex[:24]}", len(upload.data)
        stored = StoredFile(
            file_id, api_key(req), filename, purpose, int(time.time()), upload.data, size
        )
        with self.state.lock:
            self.files[stored.id] = stored
        return json_response(200, stored.view())

    def _own_file(self, req: Request, file_id: str) -> StoredFile | None:
        now = time.monotonic()
        with self.state.lock:
            stored = self.files.get(file_id)
            if stored is None and file_id in self.results:
                stored = self._result_file(file_id, now)
        return stored if stored is not None and stored.api_key == api_key(req) else None

    def _result_file(self, file_id: str, now: float) -> StoredFile | None:
        """A batch's output or error file, once the batch has ended with such results."""
        batch_id, kind = self.results[file_id]
        batch = self.batches[batch_id]
        ok, failed = batch.results(now)
        if not (ok if kind == "output" else failed):
            return None
        name, ended = f"{batch_id}_{kind}.jsonl", batch.wall(batch.ending()[1])
        stored = StoredFile(file_id, batch.api_key, name, "batch_output", ended)
        self.files[file_id] = stored
        return stored

    def file(self, req: Request, file_id: str) -> Response:
        stored = self._own_file(req, file_id)
        if stored is None:
            return no_such("File", file_id)
        if stored.size is None:
            stored.size = sum(len(chunk) for chunk in self._chunks(file_id))
        return json_response(200, stored.view())

    def content(self, req: Request, file_id: str) -> Response:
        """The bytes; a batch's files are made line by line as they are sent (images are big)."""
        stored = self._own_file(req, file_id)
        if stored is None:
            return no_such("File", file_id)
        if stored.data is not None:
            return Response(200, stored.data, "application/octet-stream")
        return Response(200, content_type="application/octet-stream", stream=self._chunks(file_id))

    def _chunks(self, file_id: str) -> Iterator[bytes]:
        now = time.monotonic()
        with self.state.lock:
            batch_id, kind = self.results[file_id]
            batch = self.batches[batch_id]
            ok, failed = batch.results(now)
        for request in ok if kind == "output" else failed:
            if kind == "output":
                line = success_line(batch, request)
            else:
                line = failure_line(batch, request, now)
            yield json.dumps(line, separators=(",", ":")).encode() + b"\n"
