"""The output store against a real SeaweedFS S3 and a real directory: the same behaviour from both.

What matters is reliability I3: an image is written once, never overwritten, never visible
half-written, and its stored checksum matches the bytes.
"""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from jobs.errors import ObjectExists, StorageError
from jobs.settings import Settings
from jobs.storage import LocalStore, Store, open_store
from jobs.storage.s3 import S3Store
from tests.servers import S3Server

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8
JPEG = b"\xff\xd8\xff\xe0" + bytes(range(255, -1, -1)) * 8


def env_settings() -> Settings:
    """Settings from the environment only (a developer's .env must not leak in)."""
    return Settings(_env_file=None)  # type: ignore[call-arg]  # pydantic-settings init kwarg


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def module_bucket(s3: S3Server) -> str:
    """One bucket for this module's store tests; each test gets its own prefix in it."""
    return s3.new_bucket("storage")


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    """The same tests run on a local directory and on an S3 bucket under a fresh prefix."""
    if request.param == "local":
        return open_store(str(tmp_path / "out"), env_settings())
    request.getfixturevalue("aws_env")  # credentials + endpoint from the environment, as in use
    bucket = request.getfixturevalue("module_bucket")
    return open_store(f"s3://{bucket}/{uuid.uuid4().hex[:8]}/out", env_settings())


def content_type_of(store: Store, key: str) -> str | None:
    """What the store will serve the object as (a directory keeps no Content-Type)."""
    if isinstance(store, S3Store):
        head = store.client.head_object(Bucket=store.bucket, Key=store.uri(key).split("/", 3)[3])
        return head["ContentType"]
    return None


def test_open_store_picks_the_backend(tmp_path: Path, aws_env: S3Server) -> None:
    settings = env_settings()
    assert isinstance(open_store(str(tmp_path), settings), LocalStore)
    assert isinstance(open_store("s3://bucket/prefix", settings), S3Store)
    assert isinstance(open_store("S3://bucket", settings), S3Store)


def test_uri_format(tmp_path: Path, aws_env: S3Server) -> None:
    settings = env_settings()
    with_prefix = open_store("s3://bucket/a/b/", settings)
    assert with_prefix.root == "s3://bucket/a/b/"
    assert with_prefix.uri("b1/images/x/0.png") == "s3://bucket/a/b/b1/images/x/0.png"
    assert (
        open_store("s3://bucket", settings).uri("b1/summary.json") == "s3://bucket/b1/summary.json"
    )
    local = open_store(str(tmp_path / "out"), settings)
    assert local.uri("b1/images/x/0.png") == str(tmp_path / "out" / "b1" / "images" / "x" / "0.png")
    assert os.path.isabs(open_store("./out", settings).uri("k"))


def test_put_new_stores_bytes_type_and_checksum(store: Store) -> None:
    store.put_new("b1/images/line-1/0.png", PNG, "image/png", sha(PNG))

    assert store.get("b1/images/line-1/0.png") == PNG
    assert store.sha256_of("b1/images/line-1/0.png") == sha(PNG)
    if isinstance(store, S3Store):
        assert content_type_of(store, "b1/images/line-1/0.png") == "image/png"
        head = store.client.head_object(
            Bucket=store.bucket,
            Key=f"{store.prefix}/b1/images/line-1/0.png",
            ChecksumMode="ENABLED",
        )
        assert head["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(PNG).digest()).decode()
        assert head["Metadata"] == {"sha256": sha(PNG)}


def test_put_new_again_with_the_same_bytes_is_a_no_op(store: Store) -> None:
    store.put_new("b1/images/a/0.png", PNG, "image/png", sha(PNG))
    store.put_new("b1/images/a/0.png", PNG, "image/png", sha(PNG))  # a redelivered task

    assert store.get("b1/images/a/0.png") == PNG
    assert list(store.list_keys("b1/")) == ["b1/images/a/0.png"]


def test_put_new_never_overwrites_other_bytes(store: Store) -> None:
    store.put_new("b1/images/a/0.png", PNG, "image/png", sha(PNG))

    with pytest.raises(ObjectExists) as caught:
        store.put_new("b1/images/a/0.png", JPEG, "image/jpeg", sha(JPEG))

    assert not caught.value.retryable
    assert store.get("b1/images/a/0.png") == PNG
    assert store.sha256_of("b1/images/a/0.png") == sha(PNG)
    assert content_type_of(store, "b1/images/a/0.png") in (None, "image/png")


def test_put_new_refuses_bytes_that_do_not_match_their_checksum(store: Store) -> None:
    # On S3 the server checks x-amz-checksum-sha256 (BadDigest); locally the store does.
    truncated = PNG[:100]
    with pytest.raises(StorageError) as caught:
        store.put_new("b1/images/a/0.png", truncated, "image/png", sha(PNG))

    assert not isinstance(caught.value, ObjectExists)
    assert caught.value.retryable  # a fresh download can fix it
    if isinstance(store, S3Store):
        assert "BadDigest" in caught.value.message  # refused by the server, not by us
    assert store.get("b1/images/a/0.png") is None
    assert list(store.list_keys("")) == []


def test_concurrent_put_new_has_exactly_one_winner(store: Store) -> None:
    # Redelivered copies of one task racing: same bytes all succeed, other bytes never land.
    def same(_: int) -> None:
        store.put_new("b1/images/a/0.png", PNG, "image/png", sha(PNG))

    def other(i: int) -> str:
        data = PNG + str(i).encode()
        try:
            store.put_new("b1/images/b/0.png", data, "image/png", sha(data))
        except ObjectExists:
            return "exists"
        return "written"

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(same, range(8)))
        outcomes = list(pool.map(other, range(8)))

    assert store.get("b1/images/a/0.png") == PNG
    assert sorted(outcomes) == ["exists"] * 7 + ["written"]
    winner = store.get("b1/images/b/0.png")
    assert winner is not None
    assert store.sha256_of("b1/images/b/0.png") == sha(winner)


def test_put_replaces(store: Store) -> None:
    store.put("b1/summary.json", b'{"total": 1}', "application/json")
    store.put("b1/summary.json", b'{"total": 2}', "application/json")

    assert store.get("b1/summary.json") == b'{"total": 2}'
    assert store.sha256_of("b1/summary.json") == sha(b'{"total": 2}')
    assert content_type_of(store, "b1/summary.json") in (None, "application/json")


def test_put_file_streams_and_replaces(store: Store, tmp_path: Path) -> None:
    # Over 8 MiB, so S3 gets a multipart upload whose checksum is composite, not the object's:
    # sha256_of must then hash the bytes instead.
    big = tmp_path / "results.jsonl"
    big.write_bytes(os.urandom(9 * 1024 * 1024))
    small = tmp_path / "small.jsonl"
    small.write_bytes(b'{"line": 1}\n')

    store.put_file("b1/results.jsonl", str(small), "application/x-ndjson")
    store.put_file("b1/results.jsonl", str(big), "application/x-ndjson")

    assert store.sha256_of("b1/results.jsonl") == sha(big.read_bytes())
    assert store.get("b1/results.jsonl") == big.read_bytes()
    assert content_type_of(store, "b1/results.jsonl") in (None, "application/x-ndjson")


def test_missing_keys_read_as_none(store: Store) -> None:
    assert store.get("b1/nothing.json") is None
    assert store.sha256_of("b1/nothing.json") is None
    assert list(store.list_keys("b1/")) == []


def test_list_keys_under_a_prefix(store: Store) -> None:
    for key in [
        "b1/records/a.json",
        "b1/records/b.json",
        "b1/records/deep/c.json",
        "b1/records-old.json",
        "b1/summary.json",
        "b2/records/a.json",
    ]:
        store.put(key, b"{}", "application/json")

    assert sorted(store.list_keys("b1/records/")) == [
        "b1/records/a.json",
        "b1/records/b.json",
        "b1/records/deep/c.json",
    ]
    assert sorted(store.list_keys("b1/records")) == [
        "b1/records-old.json",
        "b1/records/a.json",
        "b1/records/b.json",
        "b1/records/deep/c.json",
    ]
    assert len(list(store.list_keys(""))) == 6


def test_invalid_keys_are_refused(store: Store) -> None:
    for key in ("", "/abs", "a//b", "../escape", "a/../b", "a/./b"):
        with pytest.raises(StorageError):
            store.put(key, b"x", "text/plain")


def test_local_writes_leave_no_temp_files(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    store.put_new("b1/images/a/0.png", PNG, "image/png", sha(PNG))
    with pytest.raises(ObjectExists):
        store.put_new("b1/images/a/0.png", JPEG, "image/jpeg", sha(JPEG))
    store.put("b1/summary.json", b"{}", "application/json")

    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == ["b1/images/a/0.png", "b1/summary.json"]


def test_s3_errors_are_clear_and_keep_secrets_out(aws_env: S3Server) -> None:
    missing = open_store("s3://no-such-bucket-imagebatch/x", env_settings())
    with pytest.raises(StorageError) as caught:
        missing.put("k", b"x", "text/plain")

    assert "NoSuchBucket" in caught.value.message
    assert "s3://no-such-bucket-imagebatch/x/k" in caught.value.message
    assert not caught.value.retryable
    assert aws_env.secret_key not in caught.value.message
    assert aws_env.access_key not in caught.value.message


def test_s3_wrong_secret_is_not_retryable(
    aws_env: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store = open_store(f"s3://{s3_bucket}", env_settings())
    with pytest.raises(StorageError) as caught:
        store.put_new("k.png", PNG, "image/png", sha(PNG))

    assert "SignatureDoesNotMatch" in caught.value.message
    assert not caught.value.retryable
    assert "not-the-secret" not in caught.value.message
