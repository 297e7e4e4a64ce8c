"""``imagebatch run`` delivers its batch's summary to ``IMAGEBATCH_NOTIFY_URL`` before it exits."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tests.harness import CATALOG, run_batch
from tests.receivers import SECRET
from worker.batch import notify


def test_imagebatch_run_delivers_its_summary_before_it_exits(receiver: Any, tmp_path: Path) -> None:
    # A slow 500 first: it comes back after the CLI has stopped its worker and is exiting,
    # so the retry only happens because exit waits for it (a bare daemon thread would die).
    rx = receiver((8.0, 500), (0.2, 200))
    result = run_batch(
        CATALOG,
        "simulator",
        tmp_path,
        "notified",
        env={"IMAGEBATCH_NOTIFY_URL": rx.url, "IMAGEBATCH_NOTIFY_SECRET": SECRET},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(rx.requests) == 2, "the notification was lost when the CLI exited"
    got = rx.requests[-1]
    assert notify.verify(got.body, SECRET, got.headers["X-Imagebatch-Signature"])
    sent = json.loads(got.body)
    stored = json.loads((tmp_path / "notified" / "summary.json").read_text())
    assert sent == stored
    assert (sent["batch_id"], sent["total"], sent["succeeded"]) == ("notified", 20, 20)
    assert (sent["failed"], sent["rejected"], sent["credits"]) == (0, 0, 552)
    assert SECRET not in result.stdout + result.stderr
    assert "tok3n-secret-path" not in result.stdout + result.stderr
