"""``imagebatch schedule``: submits every new manifest of an inbox, once (placeholder)."""

from __future__ import annotations

from jobs.errors import ConfigError
from jobs.settings import CoreSettings


def run_schedule(settings: CoreSettings) -> None:
    if not settings.inbox:
        raise ConfigError("no inbox: set IMAGEBATCH_INBOX to a folder or s3://bucket/prefix")
    raise ConfigError("the inbox schedule is not available yet")
