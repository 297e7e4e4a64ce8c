"""The Batch API client against the simulator: upload, create, find, poll, cancel, read results."""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from jobs.errors import AmbiguousSubmit, BatchStop, PermanentProviderError, TransientProviderError
from jobs.providers import openai_batch_api
from jobs.providers.openai_batch_api import OpenAIBatchAPI
from jobs.providers.openai_batch_objects import (
    BatchError,
    BatchInfo,
    BatchStatus,
    RequestCounts,
    input_line,
)
from jobs.settings import ProviderConfig
from jobs.simulator import BatchConfig, Faults, Simulator, SimulatorConfig

FAST = BatchConfig(
    request_latency_s=0.05, concurrency=4, validating_s=0.05, finalizing_s=0.05, cancelling_s=0.1
)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(image_mode="tiny", batch=FAST)) as simulator:
        yield simulator


def connect(sim: Simulator, key: str = "sk-client") -> OpenAIBatchAPI:
    config = ProviderConfig("openai-batch", sim.url_for("openai"), SecretStr(key), 4, 2.0, 30.0)
    return OpenAIBatchAPI(config)


@pytest.fixture
def api(sim: Simulator) -> Iterator[OpenAIBatchAPI]:
    with connect(sim) as client:
        yield client


def body(prompt: str = "a kettle", **fields: Any) -> dict[str, Any]:
    return {"model": "gpt-image-1.5", "prompt": prompt, "quality": "low"} | fields


def jsonl(*items: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(input_line(custom_id, request) for custom_id, request in items)


def submit(api: OpenAIBatchAPI, data: bytes, **metadata: str) -> BatchInfo:
    file_id = api.upload("input.jsonl", [data], len(data))
    return api.create(file_id, metadata=metadata or None)


def until_done(api: OpenAIBatchAPI, batch_id: str, timeout: float = 5.0) -> BatchInfo:
    deadline = time.monotonic() + timeout
    while not (info := api.get(batch_id)).done:
        assert time.monotonic() < deadline, f"{batch_id} still {info.status}"
        time.sleep(0.01)
    return info


def requests_made(sim: Simulator, label: str) -> int:
    return sum(n for key, n in sim.ledger()["requests"].items() if key.startswith(label + " "))


def test_a_batch_is_uploaded_created_polled_and_its_two_files_read(
    sim: Simulator, api: OpenAIBatchAPI
) -> None:
    data = jsonl(("a", body(n=2)), ("b", body(size="1536x1024")), ("c", body("[[policy]] x")))
    created = submit(api, data, run="r-1", part="0")
    assert created.status == BatchStatus.VALIDATING and not created.done
    assert created.metadata == {"run": "r-1", "part": "0"} and created.created_at > 0
    assert created.input_file_id.startswith("file-") and created.model == "gpt-image-1.5"
    done = until_done(api, created.id)
    assert done.status == BatchStatus.COMPLETED and done.errors == ()
    assert done.request_counts == RequestCounts(total=3, completed=2, failed=1)
    assert done.output_file_id is not None and done.error_file_id is not None
    output = {item["custom_id"]: item for item in api.lines(done.output_file_id)}
    assert set(output) == {"a", "b"}
    assert len(output["a"]["response"]["body"]["data"]) == 2
    [refused] = api.lines(done.error_file_id)
    assert refused["custom_id"] == "c"
    assert refused["response"]["body"]["error"]["code"] == "moderation_blocked"


def test_an_upload_streams_from_a_path_or_from_chunks_of_a_known_size(
    sim: Simulator, api: OpenAIBatchAPI, tmp_path: Path
) -> None:
    data = jsonl(*((f"line-{i}", body()) for i in range(300)))
    path = tmp_path / "input.jsonl"
    path.write_bytes(data)
    chunks = (data[i : i + 1000] for i in range(0, len(data), 1000))
    for file_id in (api.upload("input.jsonl", path), api.upload("input.jsonl", chunks, len(data))):
        assert file_id.startswith("file-")
        assert [item["custom_id"] for item in api.lines(file_id)] == [
            f"line-{i}" for i in range(300)
        ]
    with pytest.raises(ValueError, match="size"):
        api.upload("input.jsonl", iter([data]))
    with pytest.raises(ValueError, match="announced"):
        api.upload("input.jsonl", iter([data]), len(data) + 5)
    with pytest.raises(ValueError, match="announced"):
        api.upload("input.jsonl", iter([data, b"more"]), len(data))


def test_a_lost_create_is_ambiguous_never_retried_and_find_locates_the_batch(
    sim: Simulator, api: OpenAIBatchAPI
) -> None:
    data = jsonl(("a", body()))
    file_id = api.upload("input.jsonl", [data], len(data))
    before = time.time()
    sim.update(batch={"create_drop": 1.0})
    with pytest.raises(AmbiguousSubmit):
        api.create(file_id, metadata={"run": "r-7", "part": "3"})
    sim.update(batch={"create_drop": 0.0})
    assert sim.ledger()["requests"]["POST /openai/v1/batches dropped"] == 1
    assert requests_made(sim, "POST /openai/v1/batches") == 1  # the one create; no retry
    found = api.find({"run": "r-7", "part": "3"}, created_after=before)
    assert found is not None and found.input_file_id == file_id
    assert until_done(api, found.id).request_counts.completed == 1
    assert [b["id"] for b in sim.ledger()["openai_batches"]] == [found.id]


def test_a_5xx_answer_to_create_is_ambiguous_too_and_find_then_shows_none_was_made(
    sim: Simulator, api: OpenAIBatchAPI
) -> None:
    data = jsonl(("a", body()))
    file_id = api.upload("input.jsonl", [data], len(data))
    sim.update(faults=Faults(error_5xx=1.0))
    with pytest.raises(AmbiguousSubmit) as raised:
        api.create(file_id, metadata={"run": "r-8"})
    assert raised.value.status == 503
    sim.update(faults=Faults())
    assert api.find({"run": "r-8"}) is None


def test_find_reads_newest_first_page_by_page_and_stops_at_created_after(
    sim: Simulator, api: OpenAIBatchAPI, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(openai_batch_api, "PAGE_SIZE", 2)
    data = jsonl(("a", body()))
    file_id = api.upload("input.jsonl", [data], len(data))
    made = [api.create(file_id, metadata={"run": "r", "part": str(i)}) for i in range(5)]
    lists = requests_made(sim, "GET /openai/v1/batches")
    oldest = api.find({"run": "r", "part": "0"})
    assert oldest is not None and oldest.id == made[0].id
    assert requests_made(sim, "GET /openai/v1/batches") - lists == 3
    newest = api.find({"run": "r"})
    assert newest is not None and newest.id == made[-1].id
    assert api.find({"run": "r", "part": "9"}) is None
    lists = requests_made(sim, "GET /openai/v1/batches")
    assert api.find({"part": "0"}, created_after=time.time() + 60) is None
    assert requests_made(sim, "GET /openai/v1/batches") - lists == 1


def test_a_cancelled_batch_keeps_what_finished_and_reports_the_rest_cancelled(
    sim: Simulator, api: OpenAIBatchAPI
) -> None:
    sim.update(batch={"request_latency_s": 0.2, "concurrency": 1, "cancelling_s": 0.05})
    batch = submit(api, jsonl(*((f"r{i}", body()) for i in range(5))))
    deadline = time.monotonic() + 5
    while api.get(batch.id).request_counts.completed < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert api.cancel(batch.id).status == BatchStatus.CANCELLING
    assert api.cancel(batch.id).status == BatchStatus.CANCELLING
    done = until_done(api, batch.id)
    assert done.status == BatchStatus.CANCELLED and done.output_file_id and done.error_file_id
    kept = [item["custom_id"] for item in api.lines(done.output_file_id)]
    dropped = [item["error"]["code"] for item in api.lines(done.error_file_id)]
    assert kept and set(dropped) == {"batch_cancelled"} and len(kept) + len(dropped) == 5
    assert done.request_counts == RequestCounts(5, len(kept), len(dropped))
    with pytest.raises(PermanentProviderError):
        api.cancel(batch.id)


def test_an_expired_batch_returns_its_finished_work_and_expires_the_rest(
    sim: Simulator, api: OpenAIBatchAPI
) -> None:
    sim.update(batch={"window_s": 0.5})
    batch = submit(api, jsonl(("ok", body()), ("stuck", body("[[never-finish]] x"))))
    done = until_done(api, batch.id)
    assert done.status == BatchStatus.EXPIRED and done.done
    assert done.output_file_id is not None and done.error_file_id is not None
    assert [item["custom_id"] for item in api.lines(done.output_file_id)] == ["ok"]
    [stuck] = api.lines(done.error_file_id)
    assert (stuck["custom_id"], stuck["error"]["code"]) == ("stuck", "batch_expired")
    assert sim.ledger()["credits_charged"]["openai-batch"] == pytest.approx(0.0045)


def test_a_batch_failed_validation_says_which_line_and_why(api: OpenAIBatchAPI) -> None:
    data = jsonl(("a", body())) + b"not json\n"
    done = until_done(api, submit(api, data).id)
    assert done.status == BatchStatus.FAILED
    assert done.output_file_id is None and done.error_file_id is None
    assert done.errors == (
        BatchError("invalid_json_line", "This line is not parseable as valid JSON.", None, 2),
    )


def test_a_large_output_file_is_read_line_by_line_in_bounded_memory(
    sim: Simulator, api: OpenAIBatchAPI
) -> None:
    sim.update(batch={"request_latency_s": 0, "concurrency": 50, "validating_s": 0})
    count = 1000
    data = jsonl(*((f"line-{i}", body(f"kettle {i}", n=10)) for i in range(count)))
    done = until_done(api, submit(api, data).id)
    assert done.output_file_id is not None
    with httpx.Client(headers={"Authorization": "Bearer sk-client"}) as raw:
        url = f"{sim.url_for('openai')}/v1/files/{done.output_file_id}"
        size = raw.get(url, timeout=30).json()["bytes"]
    tracemalloc.start()
    try:
        seen = sum(1 for _ in api.lines(done.output_file_id))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == count
    assert size > 4_000_000 and peak < size / 8, (size, peak)


def test_failures_are_classified_as_the_runtime_needs_them(
    sim: Simulator, api: OpenAIBatchAPI
) -> None:
    with pytest.raises(PermanentProviderError) as missing:
        api.get("batch_nope")
    assert missing.value.status == 404
    with pytest.raises(PermanentProviderError):
        list(api.lines("file-nope"))
    with connect(sim, key="invalid-key") as refused, pytest.raises(BatchStop):
        refused.get("batch_nope")
    with pytest.raises(ValueError, match="16 pairs"):
        api.create("file-x", metadata={f"k{i}": "v" for i in range(17)})
    assert requests_made(sim, "POST /openai/v1/batches") == 0
    sim.update(faults=Faults(error_429=1.0))
    with pytest.raises(TransientProviderError) as limited:
        api.get("batch_nope")
    assert limited.value.retry_after == 1.0


def test_a_file_that_breaks_off_or_holds_garbage_is_a_transient_failure() -> None:
    """Rare transport edge cases the simulator does not produce; hence a scripted transport."""
    first = b'{"custom_id": "a"}\n'

    def broken() -> Iterator[bytes]:
        yield first
        raise httpx.ReadError("connection reset")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/file-broken/content"):
            return httpx.Response(200, content=broken())
        return httpx.Response(200, content=first + b"<html>\n")

    config = ProviderConfig("openai-batch", "http://batch.test", SecretStr("sk"), 4, 2.0, 5.0)
    client = httpx.Client(transport=httpx.MockTransport(handler))
    with OpenAIBatchAPI(config, client) as api:
        lines = api.lines("file-broken")
        assert next(lines) == {"custom_id": "a"}
        with pytest.raises(TransientProviderError, match="broke off"):
            next(lines)
        with pytest.raises(TransientProviderError, match="not a JSON object"):
            list(api.lines("file-garbage"))
