"""The simulator's OpenAI Batch API over raw HTTP: files, lifecycle, validation, limits, faults
and billing, as docs/providers.md ("OpenAI's Batch API") describes them."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from jobs.simulator import BatchConfig, Faults, Simulator, SimulatorConfig

TOKEN = "sk-batch"
ENDPOINT = "/v1/images/generations"
FAST = BatchConfig(
    request_latency_s=0.05,
    concurrency=4,
    validating_s=0.05,
    finalizing_s=0.05,
    cancelling_s=0.1,
)


@pytest.fixture
def sim() -> Iterator[Simulator]:
    config = SimulatorConfig(sync_latency_s=0, image_mode="tiny", batch=FAST)
    with Simulator(config) as simulator:
        yield simulator


@pytest.fixture
def api(sim: Simulator) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=sim.url_for("openai"), headers=headers, timeout=10) as client:
        yield client


def line(custom_id: str, prompt: str = "a kettle", **body: Any) -> dict[str, Any]:
    body = {"model": "gpt-image-1.5", "prompt": prompt, "quality": "low"} | body
    return {"custom_id": custom_id, "method": "POST", "url": ENDPOINT, "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in lines)


def upload(api: httpx.Client, data: bytes, name: str = "input.jsonl") -> str:
    response = api.post("/v1/files", data={"purpose": "batch"}, files={"file": (name, data)})
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


def create(api: httpx.Client, file_id: str, **extra: Any) -> httpx.Response:
    body = {"input_file_id": file_id, "endpoint": ENDPOINT, "completion_window": "24h"} | extra
    return api.post("/v1/batches", json=body)


def start(api: httpx.Client, lines: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    response = create(api, upload(api, jsonl(lines)), **extra)
    assert response.status_code == 200, response.text
    batch: dict[str, Any] = response.json()
    return batch


def wait(api: httpx.Client, batch_id: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Every view of the batch from now until it ends."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen.append(api.get(f"/v1/batches/{batch_id}").json())
        if seen[-1]["status"] in ("completed", "failed", "expired", "cancelled"):
            return seen
        time.sleep(0.01)
    raise AssertionError(f"batch {batch_id} still {seen[-1]['status']}")


def read(api: httpx.Client, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    response = api.get(f"/v1/files/{file_id}/content")
    assert response.status_code == 200, response.text
    return [json.loads(text) for text in response.text.splitlines()]


def batch_charges(sim: Simulator) -> float:
    amount: float = sim.ledger()["credits_charged"].get("openai-batch", 0)
    return amount


# --- the happy path ----------------------------------------------------------------------------


def test_a_batch_runs_through_its_statuses_and_returns_every_image_out_of_input_order(
    sim: Simulator, api: httpx.Client
) -> None:
    lines = [line(f"line-{i}", size="1536x1024", output_format="webp", n=2) for i in range(12)]
    created = start(api, lines, metadata={"run": "r1", "part": "0"})
    assert created["object"] == "batch" and created["id"].startswith("batch_")
    assert created["status"] == "validating" and created["errors"] is None
    assert created["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert created["metadata"] == {"run": "r1", "part": "0"} and created["model"] == "gpt-image-1.5"
    views = wait(api, created["id"])
    statuses = [v["status"] for v in views]
    assert statuses == sorted(
        statuses, key=["validating", "in_progress", "finalizing", "completed"].index
    )
    assert {"in_progress", "completed"} <= set(statuses)
    done = views[-1]
    assert done["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    assert done["error_file_id"] is None and done["output_file_id"].startswith("file-")
    stamps = ("created_at", "in_progress_at", "finalizing_at", "completed_at", "expires_at")
    assert all(isinstance(done[k], int) for k in stamps)
    assert done["failed_at"] is done["cancelled_at"] is done["expired_at"] is None
    output = read(api, done["output_file_id"])
    assert sorted(item["custom_id"] for item in output) == sorted(f"line-{i}" for i in range(12))
    assert [item["custom_id"] for item in output] != [f"line-{i}" for i in range(12)]
    first = output[0]
    assert first["id"].startswith("batch_req_") and first["error"] is None
    assert first["response"]["status_code"] == 200 and first["response"]["request_id"]
    body = first["response"]["body"]
    assert body["size"] == "1536x1024" and body["usage"]["output_tokens"] > 0
    images = [Image.open(io.BytesIO(base64.b64decode(d["b64_json"]))) for d in body["data"]]
    assert [(i.format, i.size) for i in images] == [("WEBP", (96, 64))] * 2  # tiny: 1/16


def test_each_succeeded_request_is_billed_once_at_half_the_synchronous_price(
    sim: Simulator, api: httpx.Client
) -> None:
    lines = [
        line("a", quality="high", size="1536x1024"),  # $0.200 / 2
        line("b", quality="medium", n=3),  # 3 x $0.034 / 2
        line("c", quality="low", size="1024x1536"),  # $0.013 / 2
        line("d", "[[policy]] a kettle"),  # refused: not billed
    ]
    batch = start(api, lines)
    wait(api, batch["id"])
    for _ in range(3):  # looking again never bills again
        api.get(f"/v1/batches/{batch['id']}")
        sim.ledger()
    assert batch_charges(sim) == pytest.approx(0.1 + 0.051 + 0.0065)
    requests = {r["custom_id"]: r for r in sim.ledger()["openai_batch_requests"]}
    assert {k: r["billed"] for k, r in requests.items()} == {
        "a": 0.1,
        "b": 0.051,
        "c": 0.0065,
        "d": 0,
    }
    assert {r["status"] for r in requests.values()} == {"succeeded", "failed"}
    assert all(r["batch"] == batch["id"] for r in requests.values())
    [entry] = sim.ledger()["openai_batches"]
    assert entry["id"] == batch["id"] and entry["status"] == "completed"
    assert entry["request_counts"] == {"total": 4, "completed": 3, "failed": 1}


def test_a_request_is_billed_when_it_finishes_not_when_the_batch_is_created(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(batch={"request_latency_s": 0.6, "concurrency": 1})
    batch = start(api, [line("slow-1"), line("slow-2")])
    assert batch_charges(sim) == 0
    statuses = {r["status"] for r in sim.ledger()["openai_batch_requests"]}
    assert statuses == {"pending"}
    wait(api, batch["id"])
    assert batch_charges(sim) == pytest.approx(2 * 0.0045)


# --- requests that fail alone ------------------------------------------------------------------


def test_refused_bodies_moderation_and_a_first_failure_land_in_the_error_file(
    sim: Simulator, api: httpx.Client
) -> None:
    lines = [
        line("ok"),
        line("bad-size", size="2048x1152"),
        line("unknown-field", style="vivid"),
        line("policy", "[[policy]] a kettle"),
        line("flaky", "[[fail-once]] a kettle"),
    ]
    done = wait(api, start(api, lines)["id"])[-1]
    assert done["status"] == "completed"
    assert done["request_counts"] == {"total": 5, "completed": 1, "failed": 4}
    errors = {item["custom_id"]: item for item in read(api, done["error_file_id"])}
    assert set(errors) == {"bad-size", "unknown-field", "policy", "flaky"}
    assert all(item["error"] is None for item in errors.values())
    bad = errors["bad-size"]["response"]
    assert bad["status_code"] == 400 and bad["body"]["error"]["param"] == "size"
    assert bad["body"]["error"]["type"] == "invalid_request_error"
    assert errors["unknown-field"]["response"]["body"]["error"]["code"] == "unknown_parameter"
    policy = errors["policy"]["response"]
    assert policy["status_code"] == 400
    assert policy["body"]["error"]["code"] == "moderation_blocked"
    assert errors["flaky"]["response"]["status_code"] == 500
    assert errors["flaky"]["response"]["body"]["error"]["type"] == "server_error"
    again = wait(api, start(api, [line("flaky", "[[fail-once]] a kettle")])["id"])[-1]
    assert again["request_counts"] == {"total": 1, "completed": 1, "failed": 0}


def test_injected_server_errors_fail_requests_alone_and_cost_nothing(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(batch={"error_5xx": 1.0})
    done = wait(api, start(api, [line("a"), line("b")])["id"])[-1]
    assert done["output_file_id"] is None
    assert [e["response"]["status_code"] for e in read(api, done["error_file_id"])] == [500, 500]
    assert batch_charges(sim) == 0


# --- batches that fail as a whole --------------------------------------------------------------

GOOD = json.dumps(line("good")).encode()


@pytest.mark.parametrize(
    ("data", "code", "bad_line"),
    [
        (GOOD + b"\n{not json\n", "invalid_json_line", 2),
        (GOOD + b"\n" + GOOD + b"\n", "duplicate_custom_id", 2),
        (jsonl([line("x"), line("y") | {"url": "/v1/images/edits"}]), "url_mismatch", 2),
        (jsonl([line("x"), line("y", model="gpt-image-1")]), "model_mismatch", 2),
        (b"", "empty_file", None),
    ],
)
def test_a_malformed_input_file_fails_the_whole_batch(
    sim: Simulator, api: httpx.Client, data: bytes, code: str, bad_line: int | None
) -> None:
    created = create(api, upload(api, data))
    assert created.status_code == 200
    views = wait(api, created.json()["id"])
    assert views[0]["status"] == "validating"
    failed = views[-1]
    assert failed["status"] == "failed" and isinstance(failed["failed_at"], int)
    [error] = failed["errors"]["data"]
    assert (error["code"], error["line"]) == (code, bad_line) and error["message"]
    assert failed["output_file_id"] is failed["error_file_id"] is None
    assert failed["in_progress_at"] is None
    assert failed["request_counts"] == {"total": 0, "completed": 0, "failed": 0}
    assert batch_charges(sim) == 0


def test_over_the_enqueued_limit_a_batch_fails_with_token_limit_exceeded_until_work_drains(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(batch={"enqueued_limit": 3, "request_latency_s": 0.3})
    first = start(api, [line("a", n=2)])
    second = start(api, [line("b", n=2)])
    failed = wait(api, second["id"])[-1]
    assert failed["status"] == "failed"
    [error] = failed["errors"]["data"]
    assert error["code"] == "token_limit_exceeded" and error["line"] is None
    assert error["message"].startswith("Enqueued token limit reached for gpt-image-1.5")
    assert error["message"].endswith(
        "Please try again once some in_progress batches have been completed."
    )
    assert wait(api, first["id"])[-1]["status"] == "completed"
    assert wait(api, start(api, [line("b", n=2)])["id"])[-1]["status"] == "completed"


# --- expiry and cancel -------------------------------------------------------------------------


def test_an_expired_batch_returns_and_bills_its_finished_work_and_expires_the_rest(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(batch={"window_s": 0.5})
    lines = [line("done-1"), line("done-2"), line("stuck", "[[never-finish]] a kettle")]
    views = wait(api, start(api, lines)["id"])
    expired = views[-1]
    assert expired["status"] == "expired" and isinstance(expired["expired_at"], int)
    assert "finalizing" not in [v["status"] for v in views]
    assert expired["request_counts"] == {"total": 3, "completed": 2, "failed": 1}
    assert {item["custom_id"] for item in read(api, expired["output_file_id"])} == {
        "done-1",
        "done-2",
    }
    [stuck] = read(api, expired["error_file_id"])
    assert stuck["custom_id"] == "stuck" and stuck["response"] is None
    assert stuck["error"]["code"] == "batch_expired"
    assert batch_charges(sim) == pytest.approx(2 * 0.0045)


def test_cancel_keeps_and_bills_finished_requests_and_cancels_the_rest(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(batch={"request_latency_s": 0.2, "concurrency": 1, "cancelling_s": 0.05})
    batch = start(api, [line(f"r{i}") for i in range(6)])
    deadline = time.monotonic() + 5
    while api.get(f"/v1/batches/{batch['id']}").json()["request_counts"]["completed"] < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancelling = api.post(f"/v1/batches/{batch['id']}/cancel")
    assert cancelling.status_code == 200
    assert cancelling.json()["status"] == "cancelling"
    assert isinstance(cancelling.json()["cancelling_at"], int)
    assert api.post(f"/v1/batches/{batch['id']}/cancel").json()["status"] == "cancelling"
    cancelled = wait(api, batch["id"])[-1]
    assert cancelled["status"] == "cancelled" and isinstance(cancelled["cancelled_at"], int)
    kept = [item["custom_id"] for item in read(api, cancelled["output_file_id"])]
    dropped = read(api, cancelled["error_file_id"])
    assert 1 <= len(kept) < 6 and len(kept) + len(dropped) == 6
    assert {item["error"]["code"] for item in dropped} == {"batch_cancelled"}
    assert cancelled["request_counts"] == {
        "total": 6,
        "completed": len(kept),
        "failed": 6 - len(kept),
    }
    assert batch_charges(sim) == pytest.approx(len(kept) * 0.0045)
    refused = api.post(f"/v1/batches/{batch['id']}/cancel")
    assert refused.status_code == 409 and "cancelled" in refused.json()["error"]["message"]


# --- faults ------------------------------------------------------------------------------------


def test_a_create_whose_answer_is_lost_still_made_the_batch(
    sim: Simulator, api: httpx.Client
) -> None:
    file_id = upload(api, jsonl([line("a")]))
    sim.update(batch={"create_drop": 1.0})
    with pytest.raises(httpx.RemoteProtocolError):
        create(api, file_id, metadata={"run": "lost"})
    sim.update(batch={"create_drop": 0.0})
    [found] = api.get("/v1/batches").json()["data"]
    assert found["metadata"] == {"run": "lost"}
    assert wait(api, found["id"])[-1]["status"] == "completed"
    requests = sim.ledger()["requests"]
    assert requests["POST /openai/v1/batches dropped"] == 1
    assert "POST /openai/v1/batches 200" not in requests


# --- files, listing, ownership, refusals -------------------------------------------------------


def test_an_upload_answers_a_file_object_and_its_content_is_the_bytes_sent(
    api: httpx.Client,
) -> None:
    data = jsonl([line("a"), line("b")])
    response = api.post("/v1/files", data={"purpose": "batch"}, files={"file": ("in.jsonl", data)})
    stored = response.json()
    assert stored["id"].startswith("file-") and stored["object"] == "file"
    assert (stored["bytes"], stored["filename"], stored["purpose"]) == (
        len(data),
        "in.jsonl",
        "batch",
    )
    assert stored["status"] == "processed" and isinstance(stored["created_at"], int)
    assert api.get(f"/v1/files/{stored['id']}/content").content == data
    assert api.get(f"/v1/files/{stored['id']}").json() == stored


def test_a_results_file_is_streamed_and_describes_itself(api: httpx.Client) -> None:
    done = wait(api, start(api, [line(f"l{i}") for i in range(5)])["id"])[-1]
    with api.stream("GET", f"/v1/files/{done['output_file_id']}/content") as response:
        assert response.headers["transfer-encoding"] == "chunked"
        size = sum(len(chunk) for chunk in response.iter_bytes())
    described = api.get(f"/v1/files/{done['output_file_id']}").json()
    assert described["bytes"] == size and described["purpose"] == "batch_output"
    assert described["filename"] == f"{done['id']}_output.jsonl"


@pytest.mark.parametrize(
    ("form", "files", "message"),
    [
        ({"purpose": "fine-tune"}, {"file": ("in.jsonl", b"{}")}, "purpose 'batch'"),
        ({"purpose": "batch"}, {"file": ("in.csv", b"{}")}, "Must be .jsonl"),
        ({"purpose": "batch"}, None, "'file'"),
    ],
)
def test_uploads_the_batch_api_refuses(
    api: httpx.Client, form: dict[str, str], files: dict[str, Any] | None, message: str
) -> None:
    if files is None:
        response = api.post("/v1/files", data=form, files={"other": ("x.txt", b"x")})
    else:
        response = api.post("/v1/files", data=form, files=files)
    assert response.status_code == 400 and message in response.json()["error"]["message"]
    assert api.post("/v1/files", json={"purpose": "batch"}).status_code == 400


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"completion_window": "48h"}, "completion_window"),
        ({"endpoint": "/v1/chat/completions"}, "endpoint"),
        ({"endpoint": "/v2/nothing"}, "endpoint"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
        ({"metadata": {"k" * 65: "v"}}, "metadata." + "k" * 65),
        ({"metadata": {"k": "v" * 513}}, "metadata.k"),
        ({"metadata": {"k": 1}}, "metadata.k"),
        ({"surprise": True}, "surprise"),
    ],
)
def test_creates_the_batch_api_refuses(
    sim: Simulator, api: httpx.Client, extra: dict[str, Any], param: str
) -> None:
    response = create(api, upload(api, jsonl([line("a")])), **extra)
    assert response.status_code == 400 and response.json()["error"]["param"] == param
    assert sim.ledger()["openai_batches"] == []


def test_batches_list_newest_first_a_page_at_a_time(api: httpx.Client) -> None:
    file_id = upload(api, jsonl([line("a")]))
    ids = [create(api, file_id, metadata={"n": str(i)}).json()["id"] for i in range(5)]
    first = api.get("/v1/batches", params={"limit": 2}).json()
    assert first["object"] == "list" and first["has_more"] is True
    assert [b["id"] for b in first["data"]] == ids[::-1][:2]
    assert (first["first_id"], first["last_id"]) == (ids[4], ids[3])
    rest = api.get("/v1/batches", params={"limit": 10, "after": first["last_id"]}).json()
    assert [b["id"] for b in rest["data"]] == ids[::-1][2:] and rest["has_more"] is False
    assert api.get("/v1/batches", params={"limit": 0}).status_code == 400


def test_files_and_batches_belong_to_the_key_that_made_them(
    sim: Simulator, api: httpx.Client
) -> None:
    file_id = upload(api, jsonl([line("a")]))
    batch = wait(api, create(api, file_id).json()["id"])[-1]
    with httpx.Client(
        base_url=sim.url_for("openai"), headers={"Authorization": "Bearer sk-other"}, timeout=5
    ) as other:
        assert other.get(f"/v1/files/{file_id}/content").status_code == 404
        assert other.get(f"/v1/files/{batch['output_file_id']}/content").status_code == 404
        assert other.get(f"/v1/batches/{batch['id']}").status_code == 404
        assert other.get("/v1/batches").json()["data"] == []
        refused = create(other, file_id)
        assert refused.status_code == 404 and refused.json()["error"]["param"] == "input_file_id"
    unauthorised = httpx.get(sim.url_for("openai") + "/v1/batches", timeout=5)
    assert unauthorised.status_code == 401


def test_batch_settings_change_at_runtime_and_reject_typos(sim: Simulator) -> None:
    changed = httpx.post(
        sim.base_url + "/_sim/config", json={"batch": {"window_s": 60, "concurrency": 2}}
    )
    assert changed.status_code == 200
    assert changed.json()["batch"]["window_s"] == 60 and sim.config.batch.concurrency == 2
    assert sim.config.batch.request_latency_s == FAST.request_latency_s
    typo = httpx.post(sim.base_url + "/_sim/config", json={"batch": {"windows": 60}})
    assert typo.status_code == 400 and "windows" in typo.json()["error"]
    with pytest.raises(ValueError, match=r"batch\.create_drop"):
        sim.update(batch={"create_drop": 2})
    sim.update(faults=Faults(seed=3))
    assert sim.config.batch.window_s == 60
