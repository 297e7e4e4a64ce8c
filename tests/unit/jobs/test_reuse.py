"""Taking what another batch under the same output already bought, against a real directory and
a real SeaweedFS S3: the index files, the lookup, the copies (server-side on S3, hard links in a
directory) and the rows that say where the images came from."""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from pathlib import Path
from typing import Any

import pytest

from jobs.errors import ObjectExists, StorageError
from jobs.manifest.request import ImageRequest
from jobs.output import layout, parts, reuse
from jobs.output.rows import ImageRef, ResultRow
from jobs.settings import Settings
from jobs.storage import LocalStore, Store, open_store
from jobs.storage.s3 import S3Store
from tests.servers import S3Server

PROVIDER = "apiframe"


def env_settings() -> Settings:
    return Settings(_env_file=None)  # type: ignore[call-arg]  # pydantic-settings init kwarg


@pytest.fixture(scope="module")
def module_bucket(s3: S3Server) -> str:
    return s3.new_bucket("reuse")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return open_store(str(tmp_path / "out"), env_settings())
    request.getfixturevalue("aws_env")
    bucket = request.getfixturevalue("module_bucket")
    return open_store(f"s3://{bucket}/{uuid.uuid4().hex[:8]}/out", env_settings())


def image(seed: str) -> bytes:
    return b"\x89PNG\r\n\x1a\n" + hashlib.sha256(seed.encode()).digest() * 40


def line(i: int, **fields: Any) -> dict[str, Any]:
    return {"id": f"mug-{i}", "prompt": f"a mug, colour {i}", "quality": "low", **fields}


def bought(
    store: Store, batch: str, lines: list[dict[str, Any]], status: str = "succeeded"
) -> None:
    """What a batch leaves once it bought ``lines``: images, part file and index."""
    rows = {}
    for idx, fields in enumerate(lines):
        request = ImageRequest.model_validate(fields)
        refs = []
        for k in range(request.n if status == "succeeded" else 0):
            data = image(f"{batch}/{request.line_id}/{k}")
            key = layout.image_key(batch, request.line_id, k, "png")
            store.put_new(key, data, "image/png", hashlib.sha256(data).hexdigest())
            refs.append(
                ImageRef(
                    uri=store.uri(key),
                    sha256=hashlib.sha256(data).hexdigest(),
                    bytes=len(data),
                    content_type="image/png",
                    width=64,
                    height=64,
                )
            )
        row = ResultRow(
            line=idx + 1,
            id=request.line_id,
            status=status,  # type: ignore[arg-type]
            prompt=request.prompt,
            model=request.model,
            provider=request.provider or PROVIDER,
            fingerprint=request.fingerprint(request.provider or PROVIDER),
            job_id=f"job-{batch}-{idx}",
            attempts=1,
            credits=4.0,
            images=refs,
            metadata=request.metadata,
        )
        rows[idx] = row.model_dump_json()
    reuse.record(store, batch, 0, rows)


def manifest(tmp_path: Path, lines: list[dict[str, Any]]) -> str:
    path = tmp_path / f"manifest-{uuid.uuid4().hex[:6]}.jsonl"
    path.write_text("".join(json.dumps(fields) + "\n" for fields in lines))
    return str(path)


def take_all(
    store: Store, batch: str, path: str, lines: list[dict[str, Any]]
) -> tuple[list[int], dict[int, dict[str, Any]]]:
    """Run both passes as ``start_batch`` does: the lines taken, and this batch's rows."""
    wanted = reuse.Wanted()
    for idx, fields in enumerate(lines):
        request = ImageRequest.model_validate(fields)
        wanted.add(request.fingerprint(request.provider or PROVIDER), idx)
    wanted.freeze()
    claims = reuse.find(store, wanted, len(lines), exclude=batch)
    taken = [
        idx
        for idx, _ in reuse.take(
            store, batch, path, claims, lambda r: r.provider or PROVIDER, chunk_lines=1000
        )
    ]
    stored = store.get(layout.part_key(batch, 0))
    rows = {idx: json.loads(text) for idx, text in parts.decode_entries(stored or b"").items()}
    return taken, rows


def test_copy_new_copies_inside_the_store_and_never_overwrites(store: Store) -> None:
    data, other = image("a"), image("b")
    store.put_new("a/images/x/0.png", data, "image/png", hashlib.sha256(data).hexdigest())
    store.put_new("a/images/y/0.png", other, "image/png", hashlib.sha256(other).hexdigest())
    digest = hashlib.sha256(data).hexdigest()
    store.copy_new("a/images/x/0.png", "b/images/x/0.png", digest, len(data))
    assert store.get("b/images/x/0.png") == data
    assert store.sha256_of("b/images/x/0.png") == digest
    store.copy_new("a/images/x/0.png", "b/images/x/0.png", digest, len(data))  # same: a no-op
    with pytest.raises(ObjectExists):
        store.copy_new("a/images/x/0.png", "a/images/y/0.png", digest, len(data))
    assert store.get("a/images/y/0.png") == other
    with pytest.raises(StorageError) as missing:
        store.copy_new("a/images/gone/0.png", "b/images/gone/0.png", digest, len(data))
    assert not missing.value.retryable
    assert store.get("b/images/gone/0.png") is None
    if isinstance(store, S3Store):
        head = store.client.head_object(Bucket=store.bucket, Key=f"{store.prefix}/b/images/x/0.png")
        assert head["ContentType"] == "image/png"
    else:
        assert isinstance(store, LocalStore)
        source, copy = store.base / "a/images/x/0.png", store.base / "b/images/x/0.png"
        assert os.stat(source).st_ino == os.stat(copy).st_ino, "a hard link, not a second copy"


def test_a_line_bought_by_another_batch_is_taken_with_its_images_and_says_where_from(
    store: Store, tmp_path: Path
) -> None:
    first = [line(i, n=2 if i == 1 else 1) for i in range(3)]
    bought(store, "first", first)
    # The same lines, one prompt edited, and metadata changed (not sent: still the same image)
    again = [line(0, metadata={"sku": "new"}), line(1, n=2), line(2, prompt="a mug, edited")]
    taken, rows = take_all(store, "second", manifest(tmp_path, again), again)
    assert taken == [0, 1]
    first_rows = {
        idx: json.loads(text)
        for idx, text in parts.decode_entries(store.get(layout.part_key("first", 0)) or b"").items()
    }
    for idx in taken:
        row, source = rows[idx], first_rows[idx]
        assert row["status"] == "succeeded" and row["credits"] == 0 and row["attempts"] == 0
        assert row["reused_from"] == {
            "batch": "first",
            "line": idx + 1,
            "job_id": f"job-first-{idx}",
        }
        assert row["job_id"] is None and row["fingerprint"] == source["fingerprint"]
        assert [i["sha256"] for i in row["images"]] == [i["sha256"] for i in source["images"]]
        for k, ref in enumerate(row["images"]):
            key = layout.image_key("second", row["id"], k, "png")
            assert ref["uri"] == store.uri(key)
            assert hashlib.sha256(store.get(key) or b"").hexdigest() == ref["sha256"]
    assert rows[0]["metadata"] == {"sku": "new"}, "the row carries this manifest's metadata"
    assert 2 not in rows and store.get(layout.image_key("second", "mug-2", 0, "png")) is None
    # The copies are this batch's own now: a third batch finds them here too
    index = (store.get(layout.stored_key("second", 0)) or b"").decode().splitlines()
    assert sorted(entry.split("\t")[1] for entry in index) == ["0", "1"]


@pytest.mark.parametrize(
    "change",
    [
        {"size": "1536x1024"},
        {"quality": "high"},
        {"n": 2},
        {"provider": "openai"},
        {"model": "gpt-image-1"},
        {"output_format": "jpeg"},
        {"provider_params": {"seed": 7}},
        {"input_images": ["https://example.com/a.png"]},
        {"id": "mug-x"},
    ],
)
def test_a_line_that_would_buy_anything_else_is_not_taken(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    store = LocalStore(str(tmp_path / "out"))
    bought(store, "first", [line(0)])
    again = [line(0, **change)]
    taken, rows = take_all(store, "second", manifest(tmp_path, again), again)
    assert taken == [] and rows == {}


def test_only_lines_that_succeeded_with_every_image_still_stored_are_taken(
    store: Store, tmp_path: Path
) -> None:
    bought(store, "failed-run", [line(0)], status="failed")
    bought(store, "first", [line(1), line(2, n=2)])
    # Given image 1 of line 2 is gone from the first batch
    if isinstance(store, S3Store):
        store.client.delete_object(
            Bucket=store.bucket, Key=f"{store.prefix}/first/images/mug-2/1.png"
        )
    else:
        assert isinstance(store, LocalStore)
        (store.base / "first/images/mug-2/1.png").unlink()
    again = [line(0), line(1), line(2, n=2)]
    taken, rows = take_all(store, "second", manifest(tmp_path, again), again)
    # Then the failed line and the line missing an image are bought, not taken
    assert taken == [1] and sorted(rows) == [1]
    # ...and nothing of the line missing an image was left behind (its purchase stores there)
    assert store.get(layout.image_key("second", "mug-2", 0, "png")) is None
    assert store.get(layout.image_key("second", "mug-0", 0, "png")) is None


def test_an_index_is_written_from_the_whole_part_file_so_a_later_write_mends_it(
    tmp_path: Path,
) -> None:
    store = LocalStore(str(tmp_path / "out"))
    bought(store, "b", [line(0), line(1)])
    # Given a crash left the part file without its index
    os.unlink(store.base / layout.stored_key("b", 0))
    # When the chunk's next rows are written
    failed = ResultRow(line=3, id="mug-2", status="failed", provider=PROVIDER)
    reuse.record(store, "b", 0, {2: failed.model_dump_json()})
    # Then the index lists every succeeded line of the part file again, and no failed one
    index = (store.get(layout.stored_key("b", 0)) or b"").decode().splitlines()
    assert [entry.split("\t")[1] for entry in index] == ["0", "1"]


def test_a_fingerprint_in_metadata_is_not_taken_for_the_rows_own() -> None:
    row = ResultRow(
        line=1,
        id="x",
        status="succeeded",
        provider=PROVIDER,
        metadata={"fingerprint": "f" * 64, "status": "succeeded"},
    )
    assert reuse.stored_fingerprint(row.model_dump_json()) is None
    assert (
        reuse.stored_fingerprint(row.model_copy(update={"fingerprint": "a" * 64}).model_dump_json())
        == "a" * 64
    )
    failed = row.model_copy(update={"status": "failed", "fingerprint": "a" * 64})
    assert reuse.stored_fingerprint(failed.model_dump_json()) is None


def test_wanted_finds_exactly_the_manifests_lines_among_many() -> None:
    rng = random.Random(7)
    fingerprints = [f"{rng.getrandbits(256):064x}" for _ in range(50_000)]
    wanted = reuse.Wanted()
    for idx, fp in enumerate(fingerprints):
        wanted.add(fp, idx * 3)  # not every index holds a valid line
    wanted.freeze()
    assert len(wanted) == 50_000
    for idx in rng.sample(range(50_000), 500):
        assert list(wanted.lines(fingerprints[idx])) == [idx * 3]
    strangers = [f"{rng.getrandbits(256):064x}" for _ in range(5_000)]
    assert sum(len(list(wanted.lines(fp))) for fp in strangers) == 0


def test_an_index_file_with_lines_that_are_not_entries_is_read_for_what_it_holds(
    tmp_path: Path,
) -> None:
    store = LocalStore(str(tmp_path / "out"))
    bought(store, "first", [line(0), line(1)])
    key = layout.stored_key("first", 0)
    good = (store.get(key) or b"").decode().splitlines()
    junk = ["", "not an entry", f"{'z' * 64}\t1", f"{good[1].split()[0]}\tnine"]
    store.put(key, "\n".join([good[0], *junk]).encode() + b"\n", "text/plain")
    again = [line(0), line(1)]
    taken, _ = take_all(store, "second", manifest(tmp_path, again), again)
    assert taken == [0]
