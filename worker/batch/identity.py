"""Which batch a command means: its id (``--batch-id``, checked, or the one derived from the
manifest, its content and the provider), and the refusals that keep one batch one thing: a
batch is only resumed by the same manifest, output and provider (a stored line counts as done
only for a run that would buy the same thing)."""

from __future__ import annotations

import re
from typing import Any

from jobs.errors import ConfigError
from jobs.manifest.spool import Spooled, default_batch_id, legacy_batch_id
from jobs.output import layout, results
from jobs.storage import Store
from worker.redis import keys

BATCH_ID = re.compile(r"[A-Za-z0-9_.-]{1,100}")


def check_batch_id(batch_id: str) -> str:
    if not BATCH_ID.fullmatch(batch_id) or set(batch_id) == {"."}:
        raise ConfigError(f"--batch-id {batch_id!r}: use 1-100 letters, digits, '-', '_', '.'")
    if batch_id in keys.RESERVED:
        raise ConfigError(f"--batch-id {batch_id!r} is a word imagebatch keeps: choose another")
    return batch_id


def default_batch(store: Store, source: str, sha256: str, provider: str, fresh: bool) -> str:
    """The batch id a run without ``--batch-id`` resumes (``default_batch_id``); a batch an
    earlier version started under the id without the provider is resumed under that id, when
    it was bought from this same provider, rather than bought again."""
    legacy = legacy_batch_id(source, sha256)
    if not fresh:
        info = results.read_json(store, layout.info_key(legacy)) or {}
        if info.get("manifest_sha") == sha256 and info.get("provider") == provider:
            return legacy
    return default_batch_id(source, sha256, provider, fresh=fresh)


def same_live_batch(
    batch: str, live: dict[str, str], spooled: Spooled, out: str, provider: str
) -> None:
    """A batch running in Redis is only resumed by the same manifest, output and provider."""
    if live.get("manifest_sha") != spooled.sha256:
        raise ConfigError(
            f"batch {batch} is running with another manifest: choose another --batch-id"
        )
    if live.get("out") != out:
        raise ConfigError(
            f"batch {batch} writes to {live.get('out')}: pass --out {live.get('out')}"
        )
    same_provider(batch, live.get("provider"), provider, "is running")


def same_stored_batch(
    batch: str, store: Store, info: dict[str, Any] | None, spooled: Spooled, provider: str
) -> None:
    """A batch stored under the output is only resumed by the same manifest and provider."""
    if info is not None and info.get("manifest_sha") not in (None, spooled.sha256):
        raise ConfigError(
            f"batch {batch} under {store.uri(batch)} was made from another manifest: "
            "choose another --batch-id"
        )
    if info is not None:
        same_provider(
            batch, info.get("provider"), provider, f"under {store.uri(batch)} was started"
        )


def same_provider(batch: str, had: str | None, provider: str, where: str) -> None:
    """A stored line only counts as done for a run that would buy the same thing: resuming a
    batch on another provider would pass one provider's images off as another's."""
    if had and had != provider:
        raise ConfigError(
            f"batch {batch} {where} with --provider {had}, not {provider}: pass "
            f"--provider {had} to resume it, or choose another --batch-id"
        )
