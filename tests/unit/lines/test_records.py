"""A line's typed state (``worker.lines.records``): the Redis hash round trip, the status table
every other module derives homes, steps and slots from, and the one rule ``Transition``
enforces."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from jobs.output.rows import ResultRow
from tests.runtime_support import request_json
from worker.lines.records import (
    ACTIVE,
    TABLE,
    TERMINAL,
    Home,
    LineRecord,
    LineStatus,
    Step,
    Transition,
    encode_changes,
)

EVERY_FIELD: dict[str, Any] = {
    "batch": "cat-2026",
    "idx": 41,
    "line": 57,
    "id": "sku-1001-mug",
    "provider": "apiframe",
    "request_json": request_json(prompt="a mug", n=2, metadata={"sku": "1001"}),
    "status": LineStatus.FETCHED,
    "seq": 9,
    "settled": 7,
    "owner": "9:ab12cd34ef56",
    "attempt": 3,
    "first_attempt": 2,
    "job_id": "3c50ad78-df8b-4f7d-8d9f-23fa954f1566",
    "accepted_at": 1796160310.1206584,
    "submitted_at": "2026-12-01T21:25:10Z",
    "deadline": 1796162110.25,
    "tries": 2,
    "ambiguous": 1,
    "polls": 5,
    "credits": 48.5,
    "reserved": 24.0,
    "expected_s": 12.75,
    "misses": 1,
    "progress": 40,
    "progress_t": 2.5,
    "poll_at": 1765000003.25,
    "fetched_at": 1796160320.5,
    "artifacts": ({"url": "https://cdn.example/1.png"}, {"blob": "ib:cat-2026:blob:41:1"}),
    "images": (
        {
            "uri": "s3://bucket/cat-2026/images/sku-1001-mug/0.png",
            "sha256": "0" * 64,
            "bytes": 1234,
            "content_type": "image/png",
            "width": 1024,
            "height": 1024,
        },
    ),
    "pool": ("oxen", "aimlapi"),
    "queue": "@aimlapi",
    "route": ({"provider": "oxen", "outcome": "unavailable", "reason": "oxen answered 503"},),
    "group": "3f9a1c2e0b7d",
}


def a_row(status: str = "failed") -> ResultRow:
    return ResultRow(line=1, id="x", status=status)  # type: ignore[arg-type]


def test_every_record_field_survives_the_redis_hash_round_trip() -> None:
    rec = LineRecord(**EVERY_FIELD)
    defaults = LineRecord(
        **{k: EVERY_FIELD[k] for k in ("batch", "idx", "line", "id")},
        provider="p",
        request_json="{}",
    )
    # The sample must set every field to a non-default value, or a field the hash drops
    # would still compare equal after the round trip.
    for f in dataclasses.fields(LineRecord):
        if f.name not in ("batch", "idx", "line", "id"):
            assert getattr(rec, f.name) != getattr(defaults, f.name), f.name

    data = rec.to_hash()

    assert all(isinstance(value, str) for value in data.values())
    assert "batch" not in data and "idx" not in data  # they are in the key, not the hash
    assert LineRecord.from_hash("cat-2026", 41, data) == rec


def test_the_request_is_stored_under_the_request_field() -> None:
    rec = LineRecord(**EVERY_FIELD)

    data = rec.to_hash()

    assert data["request"] == EVERY_FIELD["request_json"]
    assert "request_json" not in data
    assert rec.request.n == 2 and rec.request.metadata == {"sku": "1001"}


def test_a_hash_without_optional_fields_reads_as_the_defaults() -> None:
    data = {"line": "3", "id": "a", "provider": "openai", "request": request_json()}

    rec = LineRecord.from_hash("b", 2, data)

    assert rec == LineRecord(
        batch="b", idx=2, line=3, id="a", provider="openai", request_json=request_json()
    )
    assert rec.status is LineStatus.READY and rec.seq == 1 and rec.artifacts == ()


def test_empty_json_fields_read_as_empty_tuples() -> None:
    data = {**LineRecord(**EVERY_FIELD).to_hash(), "artifacts": "", "images": "[]"}

    rec = LineRecord.from_hash("cat-2026", 41, data)

    assert rec.artifacts == () and rec.images == ()


def test_encode_changes_writes_the_same_strings_as_to_hash() -> None:
    rec = LineRecord(**EVERY_FIELD)
    changes = {"request_json": rec.request_json, "credits": 48.5, "artifacts": rec.artifacts}

    assert encode_changes(changes) == {
        name: rec.to_hash()[name] for name in ("request", "credits", "artifacts")
    }


def test_a_record_knows_its_member_starts_and_status_info() -> None:
    rec = LineRecord(**EVERY_FIELD)

    assert rec.member == "cat-2026 41"
    assert rec.starts == 2  # seq 9, settled 7: two dispatches began without finishing
    assert rec.info is TABLE[LineStatus.FETCHED]


def test_every_status_has_an_entry_in_the_table() -> None:
    assert set(TABLE) == set(LineStatus)
    assert set(LineStatus) == TERMINAL | ACTIVE and not TERMINAL & ACTIVE


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_a_terminal_status_has_no_step_and_no_home(status: LineStatus) -> None:
    info = TABLE[status]

    assert info.terminal
    assert info.step is None
    assert info.home is Home.NONE
    assert not info.holds_slot


def test_the_terminal_statuses_are_succeeded_failed_and_rejected() -> None:
    assert {LineStatus.SUCCEEDED, LineStatus.FAILED, LineStatus.REJECTED} == TERMINAL


@pytest.mark.parametrize("status", sorted(ACTIVE))
def test_an_active_status_has_a_step_and_a_home(status: LineStatus) -> None:
    info = TABLE[status]

    assert not info.terminal
    assert info.step in set(Step)
    assert info.home is not Home.NONE


def test_only_submitting_and_submitted_hold_a_provider_slot() -> None:
    holding = {status for status, info in TABLE.items() if info.holds_slot}

    assert holding == {LineStatus.SUBMITTING, LineStatus.SUBMITTED}


def test_each_active_status_needs_the_step_its_name_says() -> None:
    assert TABLE[LineStatus.READY].step is Step.SUBMIT
    assert TABLE[LineStatus.SUBMITTING].step is Step.SUBMIT
    assert TABLE[LineStatus.SUBMITTED].step is Step.POLL
    assert TABLE[LineStatus.FETCHED].step is Step.STORE
    assert TABLE[LineStatus.READY].home is Home.READY
    assert TABLE[LineStatus.FETCHED].home is Home.STORE


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_a_terminal_transition_without_a_row_is_refused(status: LineStatus) -> None:
    with pytest.raises(ValueError, match="needs a row exactly when terminal"):
        Transition(status)


@pytest.mark.parametrize("status", sorted(ACTIVE))
def test_a_row_on_a_non_terminal_transition_is_refused(status: LineStatus) -> None:
    with pytest.raises(ValueError, match="needs a row exactly when terminal"):
        Transition(status, row=a_row())


def test_well_formed_transitions_are_accepted() -> None:
    assert Transition(LineStatus.FAILED, row=a_row()).row is not None
    assert Transition(LineStatus.SUBMITTED, {"polls": 1}, due_in=2.0).due_in == 2.0
