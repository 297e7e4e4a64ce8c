"""The inbox ``imagebatch schedule`` watches: a folder, or an ``s3://bucket/prefix``, behind one
small interface (list the manifests, read one, record it submitted or refused).

A folder's manifest is taken once it is ``SETTLE_S`` old and did not change while it was read;
it then moves to ``submitted/`` or ``refused/`` (with a ``.reason.txt``). An S3 manifest is read
at the ETag it was listed with and stays where it is; a marker under ``.imagebatch/`` records
it (one PUT, nothing of the user's deleted, only PutObject needed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from jobs.clock import now_iso
from jobs.errors import ConfigError, StorageError
from jobs.manifest.spool import Spooled, spool
from jobs.settings import CoreSettings
from jobs.storage import CHUNK, absolute_out, is_s3
from jobs.storage.s3 import S3Store
from jobs.text import shown

log = logging.getLogger(__name__)

SETTLE_S = 10.0
"""A folder's file this recently modified may still be being written: left for later."""
RECORDS = ".imagebatch"
"""An S3 inbox's records: ``.imagebatch/NAME.submitted.json`` and ``NAME.refused.json``."""


class Action(StrEnum):
    SUBMITTED = "submitted"  # submitted by this pass
    RECORDED = "recorded"  # submitted before (its claim says so); only its record was finished
    REFUSED = "refused"  # unusable; recorded with the reason, not retried until it changes
    BUSY = "busy"  # another scheduler holds its claim right now
    LEFT = "left"  # left for the next pass: still being written, or infrastructure trouble


@dataclass(frozen=True)
class Outcome:
    name: str
    action: Action
    batch: str | None = None
    reason: str = ""

    def describe(self) -> str:
        name = shown(self.name)
        if self.action is Action.SUBMITTED:
            return f"submitted {name} as batch {self.batch}"
        if self.action is Action.RECORDED:
            return f"{name}: already submitted as batch {self.batch}; recorded"
        if self.action is Action.REFUSED:
            return f"refused {name}: {shown(self.reason, 300)}"
        if self.action is Action.BUSY:
            return f"{name}: another scheduler is submitting it"
        return f"left {name} for the next pass: {shown(self.reason, 300)}"


@dataclass
class Found:
    """A manifest seen in a listing; ``version`` tells one upload or write from the next."""

    name: str
    source: str
    version: str
    sha256: str = ""


class Inbox(Protocol):
    uri: str

    def check(self) -> None:
        """The inbox exists and takes our records, or a ``ConfigError`` naming the fix."""

    def found(self) -> Iterator[Found | Outcome]:
        """New manifests (already recorded ones left out), or outcomes for ones left."""

    def read(self, item: Found) -> Spooled | str | None:
        """Spool it (sets ``sha256``); a reason to leave it for later; None if it went."""

    def unrecorded(self, item: Found) -> bool:
        """Still there as read, and nobody recorded it meanwhile."""

    def record_submitted(self, item: Found, record: dict[str, Any]) -> None: ...

    def record_refused(self, item: Found, reason: str) -> None: ...


def open_inbox(uri: str, settings: CoreSettings) -> Inbox:
    if is_s3(uri):
        return S3Inbox(uri.rstrip("/"), settings)
    return FolderInbox(absolute_out(uri))


def _is_manifest_name(name: str) -> bool:
    return name.endswith(".jsonl") and not name.startswith(".") and name.isprintable()


class FolderInbox:
    """A local (or shared) folder. Write manifests under a temporary name, then rename them
    into place; a file is also only taken once it has been left alone for ``SETTLE_S``."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.path = Path(uri)

    def check(self) -> None:
        if not self.path.is_dir():
            raise ConfigError(f"IMAGEBATCH_INBOX {self.uri} is not a folder: create it or fix it")
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ConfigError(
                f"IMAGEBATCH_INBOX {self.uri} is not writable: the schedule moves manifests to "
                "submitted/ and refused/ in it; give this user write access"
            )

    def found(self) -> Iterator[Found | Outcome]:
        self.check()  # a worker may not see the folder the scheduler was given
        now = time.time()
        with os.scandir(self.path) as entries:
            names = sorted(e.name for e in entries if _is_manifest_name(e.name) and e.is_file())
        for name in names:
            path = self.path / name
            try:
                info = path.stat()
            except FileNotFoundError:
                continue
            if now - info.st_mtime < SETTLE_S:
                reason = f"modified {now - info.st_mtime:.0f}s ago (still being written?)"
                yield Outcome(name, Action.LEFT, reason=reason)
                continue
            yield Found(name, str(path), _version(info))

    def read(self, item: Found) -> Spooled | str | None:
        try:
            handle = open(self.path / item.name, "rb")  # noqa: SIM115 - closed just below
        except FileNotFoundError:
            return None
        with handle:
            before = _version(os.fstat(handle.fileno()))
            if before != item.version:
                return "changed since it was listed"
            spooled = spool(iter(lambda: handle.read(CHUNK), b""))
            if _version(os.fstat(handle.fileno())) != before:
                os.unlink(spooled.path)
                return "changed while it was read (still being written?)"
        item.sha256 = spooled.sha256
        return spooled

    def unrecorded(self, item: Found) -> bool:
        try:
            return _version((self.path / item.name).stat()) == item.version
        except FileNotFoundError:
            return False

    def record_submitted(self, item: Found, record: dict[str, Any]) -> None:
        folder = self.path / "submitted"
        folder.mkdir(exist_ok=True)
        target = folder / item.name
        if target.exists():  # an earlier manifest of that name: keep it too
            target = folder / f"{record['batch_id']}.jsonl"
        if self._move(item, target):
            _write(target.with_name(target.name + ".submitted.json"), _json(record))

    def record_refused(self, item: Found, reason: str) -> None:
        folder = self.path / "refused"
        folder.mkdir(exist_ok=True)
        # The reason first: a manifest in refused/ always has its reason beside it.
        _write(folder / f"{item.name}.reason.txt", _reason_text(item, reason).encode())
        self._move(item, folder / item.name)

    def _move(self, item: Found, target: Path) -> bool:
        """Move the very file we read (not a newer one that took its name) to ``target``."""
        source = self.path / item.name
        taken = self.path / f".{item.name}.{uuid.uuid4().hex[:8]}.moving"
        try:
            source.rename(taken)
        except FileNotFoundError:
            return False  # another scheduler moved it
        if _version(taken.stat()) != item.version:  # a new file took the name just now
            try:
                os.link(taken, source)
            except FileExistsError:
                os.link(taken, self.path / f"{Path(item.name).stem}-{uuid.uuid4().hex[:8]}.jsonl")
            taken.unlink()
            return False
        taken.rename(target)
        return True


class S3Inbox:
    """A bucket and prefix. Manifests stay where they are; records go under ``.imagebatch/``."""

    def __init__(self, uri: str, settings: CoreSettings) -> None:
        self.uri = uri
        self.store = S3Store(uri, settings)

    def check(self) -> None:
        try:
            self.store.put(f"{RECORDS}/write-check", b"ok\n", "text/plain")
        except StorageError as exc:
            raise ConfigError(
                f"cannot use IMAGEBATCH_INBOX {self.uri}: {exc.message}; check the bucket, "
                "IMAGEBATCH_S3_ENDPOINT_URL and the AWS credentials (AWS_ACCESS_KEY_ID/"
                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
            ) from None

    def _full(self, name: str) -> str:
        return f"{self.store.prefix}/{name}" if self.store.prefix else name

    def found(self) -> Iterator[Found | Outcome]:
        base = self._full("")
        listed: list[tuple[str, str]] = []
        try:
            pages = self.store.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.store.bucket, Prefix=base, Delimiter="/"
            )
            for page in pages:
                for entry in page.get("Contents", []):
                    name = entry["Key"][len(base) :]
                    if _is_manifest_name(name) and "\\" not in name:
                        listed.append((name, entry["ETag"]))
        except (ClientError, BotoCoreError) as exc:
            raise ConfigError(
                f"cannot list IMAGEBATCH_INBOX {self.uri} ({type(exc).__name__}): check the "
                "bucket, IMAGEBATCH_S3_ENDPOINT_URL and the AWS credentials"
            ) from None
        try:
            records = set(self.store.list_keys(f"{RECORDS}/"))
        except StorageError as exc:
            raise ConfigError(f"cannot list IMAGEBATCH_INBOX {self.uri}: {exc.message}") from None
        for name, etag in sorted(listed):
            item = Found(name, f"s3://{self.store.bucket}/{self._full(name)}", etag)
            if not self._recorded(item, records):
                yield item

    def _recorded(self, item: Found, records: set[str] | None = None) -> bool:
        for state in ("submitted", "refused"):
            key = f"{RECORDS}/{item.name}.{state}.json"
            if records is not None and key not in records:
                continue
            data = self.store.get(key)
            try:
                if data is not None and json.loads(data).get("etag") == item.version:
                    return True
            except (ValueError, AttributeError):
                log.warning("inbox %s: %s is not a record of ours; ignored", self.uri, key)
        return False

    def read(self, item: Found) -> Spooled | str | None:
        try:
            body = self.store.client.get_object(
                Bucket=self.store.bucket, Key=self._full(item.name), IfMatch=item.version
            )["Body"]
            with contextlib.closing(body):
                spooled = spool(body.iter_chunks(CHUNK))
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("NoSuchKey", "404", "NotFound"):
                return None
            if code in ("PreconditionFailed", "412"):
                return "replaced since it was listed"
            return f"S3 answered {code or 'an error'} reading it"
        except BotoCoreError as exc:
            return f"S3 could not be read ({type(exc).__name__})"
        item.sha256 = spooled.sha256
        return spooled

    def unrecorded(self, item: Found) -> bool:
        return not self._recorded(item)

    def record_submitted(self, item: Found, record: dict[str, Any]) -> None:
        value = {"name": item.name, "etag": item.version, **record}
        self.store.put(f"{RECORDS}/{item.name}.submitted.json", _json(value), "application/json")

    def record_refused(self, item: Found, reason: str) -> None:
        value = {"name": item.name, "etag": item.version, "sha256": item.sha256}
        value |= {"state": "refused", "reason": reason, "at": now_iso()}
        self.store.put(f"{RECORDS}/{item.name}.refused.json", _json(value), "application/json")


def _version(info: os.stat_result) -> str:
    kind = "f" if stat.S_ISREG(info.st_mode) else "x"
    return f"{kind}:{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, indent=2, sort_keys=True).encode() + b"\n"


def _write(path: Path, data: bytes) -> None:
    temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    temp.write_bytes(data)
    temp.replace(path)


def _reason_text(item: Found, reason: str) -> str:
    digest = f" (sha256 {item.sha256})" if item.sha256 else ""
    return (
        f"imagebatch refused {item.name} at {now_iso()}{digest}:\n\n"
        f"{shown(reason, 4000)}\n\n"
        "Nothing was submitted. Fix it and put it in the inbox again.\n"
    )
