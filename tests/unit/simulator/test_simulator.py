"""The simulator over real HTTP: each provider surface, its errors, faults and the ledger."""

from __future__ import annotations

import base64
import io
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image, UnidentifiedImageError

from jobs.manifest.request import ImageRequest, Quality
from jobs.pricing import PriceTable
from jobs.registry import REGISTRY
from jobs.simulator import Faults, Simulator, SimulatorConfig

KEY = "afk_test_key"
TOKEN = "sk-test"
HTTP = httpx.Client(timeout=5)
"""One pooled client for CDN downloads and the sync providers (a new client per call is slow)."""


@pytest.fixture(scope="module", autouse=True)
def _close_http() -> Iterator[None]:
    yield
    HTTP.close()


@pytest.fixture
def sim() -> Iterator[Simulator]:
    with Simulator(SimulatorConfig(latency_s=0.2, sync_latency_s=0.02)) as simulator:
        yield simulator


@pytest.fixture
def api(sim: Simulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers={"X-API-Key": KEY}, timeout=5) as client:
        yield client


def submit(
    api: httpx.Client, prompt: str = "a red fox", key: str | None = None, **params: Any
) -> httpx.Response:
    body: dict[str, Any] = {"prompt": prompt, "model": "gpt-image-1.5"}
    if params:
        body["gptImageParams"] = params
    headers = {"Idempotency-Key": key} if key else {}
    return api.post("/v2/images/generate", json=body, headers=headers)


def wait(api: httpx.Client, job_id: str, timeout: float = 3.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = api.get(f"/v2/jobs/{job_id}").json()
        if job["status"] in ("COMPLETED", "FAILED"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish: {job}")


def run(api: httpx.Client, prompt: str = "a red fox", **params: Any) -> dict[str, Any]:
    response = submit(api, prompt, **params)
    assert response.status_code == 202, response.text
    return wait(api, response.json()["jobId"])


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def sync(
    sim: Simulator, provider: str, path: str, body: dict[str, Any], token: str | None = TOKEN
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return HTTP.post(sim.url_for(provider) + path, json=body, headers=headers)


def openai(sim: Simulator, token: str | None = TOKEN, **body: Any) -> httpx.Response:
    payload = {"model": "gpt-image-1.5", "prompt": "a lighthouse"} | body
    return sync(sim, "openai", "/v1/images/generations", payload, token)


def aimlapi(sim: Simulator, **body: Any) -> httpx.Response:
    payload = {"model": "openai/gpt-image-1-5", "prompt": "a lighthouse"} | body
    return sync(sim, "aimlapi", "/v1/images/generations", payload)


def omixa(sim: Simulator, **body: Any) -> httpx.Response:
    payload = {"model": "gpt-image-1.5", "prompt": "a lighthouse"} | body
    return sync(sim, "omixa", "/api/v1/images/generations", payload)


def oxen(sim: Simulator, **body: Any) -> httpx.Response:
    payload = {"model": "gpt-image-1-5", "prompt": "a lighthouse"} | body
    return sync(sim, "oxen", "/api/ai/images/generate", payload)


def cost(provider: str, quality: Quality | None = None, n: int = 1) -> float:
    table: PriceTable = REGISTRY[provider].prices
    return table.cost(ImageRequest(prompt="x", quality=quality, n=n))


# --- APIFrame -------------------------------------------------------------------------------


def test_apiframe_job_runs_queued_processing_completed_and_serves_images(
    sim: Simulator, api: httpx.Client
) -> None:
    accepted = submit(
        api, quality="low", aspect_ratio="3:2", output_format="png", number_of_images=2
    )
    assert accepted.status_code == 202
    assert accepted.json() == {"jobId": accepted.json()["jobId"], "status": "QUEUED"}
    assert accepted.headers["x-request-id"]
    job_id = accepted.json()["jobId"]
    seen = [api.get(f"/v2/jobs/{job_id}").json()]
    while seen[-1]["status"] not in ("COMPLETED", "FAILED"):
        time.sleep(0.02)
        seen.append(api.get(f"/v2/jobs/{job_id}").json())
    statuses = [j["status"] for j in seen]
    assert statuses[0] == "QUEUED" and "PROCESSING" in statuses and statuses[-1] == "COMPLETED"
    progress = [j["progress"] for j in seen if j["status"] == "PROCESSING"]
    assert progress == sorted(progress) and all(0 <= p < 100 for p in progress)
    job = seen[-1]
    assert job["progress"] == 100 and job["error"] is None and job["expired"] is False
    assert job["creditCost"] == 8 == cost("apiframe", "low", 2)
    assert job["webhookStatus"] is None and job["completedAt"] and job["createdAt"]
    assert job["input"]["gptImageParams"]["number_of_images"] == 2
    urls = job["result"]["images"]
    assert urls == [f"{sim.base_url}/cdn/images/{job_id}-{k}.png" for k in (1, 2)]
    downloads = [HTTP.get(url) for url in urls]
    for response in downloads:
        assert response.status_code == 200 and response.headers["content-type"] == "image/png"
        assert int(response.headers["content-length"]) == len(response.content)
        image = decode(response.content)
        assert (image.format, image.size) == ("PNG", (1536, 1024))
    assert downloads[0].content != downloads[1].content


@pytest.mark.parametrize(
    ("params", "fmt", "size"),
    [
        ({}, "WEBP", (1024, 1024)),
        ({"aspect_ratio": "2:3", "output_format": "jpeg"}, "JPEG", (1024, 1536)),
        ({"background": "transparent", "output_format": "png"}, "PNG", (1024, 1024)),
    ],
)
def test_apiframe_formats_sizes_and_string_result(
    sim: Simulator, api: httpx.Client, params: dict[str, Any], fmt: str, size: tuple[int, int]
) -> None:
    sim.update(result_shape="string")
    job = run(api, **params)
    assert isinstance(job["result"], str)
    image = decode(HTTP.get(job["result"]).content)
    assert (image.format, image.size) == (fmt, size)
    assert job["creditCost"] == 24
    if params.get("background") == "transparent":
        assert image.mode == "RGBA"


def test_string_shape_keeps_the_object_for_several_images(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(result_shape="string")
    assert len(run(api, number_of_images=3)["result"]["images"]) == 3


def test_gpt_image_2_uses_its_own_params_block(api: httpx.Client) -> None:
    body = {"prompt": "x", "model": "gpt-image-2", "gptImage2Params": {"moderation": "low"}}
    assert api.post("/v2/images/generate", json=body).status_code == 202


def test_idempotent_replay_returns_the_original_job_and_409_on_a_new_body(
    sim: Simulator, api: httpx.Client
) -> None:
    first = submit(api, "a boat", key="line-1", quality="medium")
    replay = submit(api, "a boat", key="line-1", quality="medium")
    assert first.status_code == replay.status_code == 202
    assert replay.json()["jobId"] == first.json()["jobId"]
    wait(api, first.json()["jobId"])
    assert submit(api, "a boat", key="line-1", quality="medium").json()["status"] == "COMPLETED"
    conflict = submit(api, "a boat", key="line-1", quality="high")
    assert conflict.status_code == 409
    assert conflict.json() == {"error": "Idempotency key reused with a different request body"}
    assert submit(api, "a boat", key="x" * 256).status_code == 400
    ledger = sim.ledger()
    assert (ledger["submits"], ledger["replays"]) == (1, 2)
    assert ledger["credits_charged"] == {"apiframe": 9}
    assert ledger["jobs"][0]["idempotency_key"] == "line-1"


def gen(model: str = "gpt-image-1.5", **fields: Any) -> dict[str, Any]:
    return {"prompt": "x", "model": model} | fields


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (gen(seed=1), "seed"),
        (gen(gptImageParams={"size": "1:1"}), "size"),
        (gen(gptImage2Params={}), "gptImage2Params"),
        (gen("gpt-image-2", gptImage2Params={"background": "transparent"}), "background"),
        (gen(gptImageParams={"quality": "ultra"}), "quality"),
        (gen(gptImageParams={"number_of_images": 11}), "number_of_images"),
        (gen(gptImageParams={"input_fidelity": "auto"}), "input_fidelity"),
        (gen(gptImageParams={"input_images": "http://a"}), "input_images"),
        (gen(prompt="x" * 2001), "prompt"),
        (gen(prompt=""), "prompt"),
        ({"prompt": "x"}, "model"),
        (gen("gpt-image-1"), "model"),
        (gen(webhookEvents=[]), "webhookEvents"),
        (["not", "an", "object"], "body"),
    ],
)
def test_apiframe_rejects_invalid_bodies_naming_the_field(
    sim: Simulator, api: httpx.Client, body: Any, field: str
) -> None:
    response = api.post("/v2/images/generate", json=body)
    assert response.status_code == 400
    assert field in response.json()["error"]
    assert sim.ledger()["submits"] == 0


def test_apiframe_job_ids_and_ownership(api: httpx.Client) -> None:
    assert api.get("/v2/jobs/not-a-uuid").status_code == 400
    missing = api.get(f"/v2/jobs/{uuid.uuid4()}")
    assert (missing.status_code, missing.json()) == (404, {"error": "Job not found"})
    job_id = submit(api).json()["jobId"]
    other = api.get(f"/v2/jobs/{job_id}", headers={"X-API-Key": "afk_someone_else"})
    assert other.status_code == 404
    listed = api.get("/v2/jobs", params={"limit": 5}).json()
    assert [j["id"] for j in listed["jobs"]] == [job_id] and listed["hasMore"] is False


@pytest.mark.parametrize(
    ("key", "status", "error"),
    [
        (None, 401, "API key is required"),
        ("sk-not-apiframe", 401, "Invalid API key"),
        ("afk_inactive_123", 403, "API key is inactive"),
    ],
)
def test_apiframe_auth_errors(sim: Simulator, key: str | None, status: int, error: str) -> None:
    headers = {"X-API-Key": key} if key else {}
    response = HTTP.post(f"{sim.base_url}/v2/images/generate", json={}, headers=headers)
    assert (response.status_code, response.json()) == (status, {"error": error})
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/v2/me", {"X-API-Key": KEY}, 200),
        ("/v2/me", {}, 401),
        ("/v2/me", {"X-API-Key": "badkey"}, 401),
        ("/v2/me", {"X-API-Key": "afk_inactive_123"}, 403),
        ("/openai/v1/models", {"Authorization": f"Bearer {TOKEN}"}, 200),
        ("/openai/v1/models", {}, 401),
        ("/openai/v1/models", {"Authorization": "Bearer invalid-key"}, 401),
    ],
)
def test_the_free_calls_that_check_a_key_answer_with_the_same_auth_and_bill_nothing(
    sim: Simulator, path: str, headers: dict[str, str], status: int
) -> None:
    response = HTTP.get(f"{sim.base_url}{path}", headers=headers)
    assert response.status_code == status, response.text
    if path.startswith("/openai") and status == 200:
        models = [model["id"] for model in response.json()["data"]]
        assert "gpt-image-1.5" in models
    ledger = sim.ledger()
    assert ledger["submits"] == 0 and not ledger["credits_charged"]


def test_insufficient_credits_is_402_with_amounts_and_creates_no_job(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(credits=30)
    assert submit(api).status_code == 202
    refused = submit(api, "another")
    assert refused.status_code == 402
    assert refused.json() == {
        "error": "Insufficient credits",
        "creditsRequired": 24,
        "creditsAvailable": 6,
    }
    assert api.get("/v2/me").json()["team"]["credits"] == 6
    ledger = sim.ledger()
    assert ledger["submits"] == 1 and ledger["requests"]["POST /v2/images/generate 402"] == 1


def test_policy_marker_fails_the_job_and_refunds(sim: Simulator, api: httpx.Client) -> None:
    sim.update(credits=24)
    job = run(api, "a [[policy]] poster")
    assert job["status"] == "FAILED" and job["creditCost"] == 0 and job["result"] is None
    assert job["error"].startswith("Content policy violation")
    ledger = sim.ledger()
    assert ledger["credits_charged"] == ledger["credits_refunded"] == {"apiframe": 24}
    assert ledger["jobs"][0]["status"] == "FAILED" and ledger["jobs"][0]["credit_cost"] == 0
    assert run(api, "a fine poster")["status"] == "COMPLETED"


def test_fail_once_marker_fails_the_first_job_only(sim: Simulator, api: httpx.Client) -> None:
    first = run(api, "[[fail-once]] a kite")
    second = run(api, "[[fail-once]] a kite")
    assert (first["status"], first["error"]) == ("FAILED", "Upstream provider timeout")
    assert second["status"] == "COMPLETED"
    assert [j["prompt"] for j in sim.ledger()["jobs"]].count("[[fail-once]] a kite") == 2


def test_never_finish_and_slow_markers(sim: Simulator, api: httpx.Client) -> None:
    stuck = submit(api, "[[never-finish]]").json()["jobId"]
    slow = submit(api, "[[slow]]").json()["jobId"]
    time.sleep(0.4)
    assert api.get(f"/v2/jobs/{stuck}").json()["status"] == "PROCESSING"
    assert api.get(f"/v2/jobs/{slow}").json()["status"] == "PROCESSING"
    assert wait(api, slow)["status"] == "COMPLETED"
    assert 0 < api.get(f"/v2/jobs/{stuck}").json()["progress"] <= 99


def test_corrupt_marker_serves_garbage_of_the_right_length(api: httpx.Client) -> None:
    job = run(api, "[[corrupt]] a vase")
    response = HTTP.get(job["result"]["images"][0])
    assert response.status_code == 200
    assert int(response.headers["content-length"]) == len(response.content) > 1000
    with pytest.raises(UnidentifiedImageError):
        decode(response.content)


def test_rate_limit_answers_429_with_retry_after_but_not_on_the_cdn(
    sim: Simulator, api: httpx.Client
) -> None:
    job = run(api)
    sim.update(rate_limit_rps=1, rate_limit_burst=2)
    codes = [api.get("/v2/me") for _ in range(3)]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert int(codes[2].headers["Retry-After"]) >= 1
    assert all(HTTP.get(job["result"]["images"][0]).status_code == 200 for _ in range(4))


def test_max_in_flight_refuses_submits_until_a_job_ends(sim: Simulator, api: httpx.Client) -> None:
    sim.update(max_in_flight=1)
    first = submit(api).json()["jobId"]
    refused = submit(api, "second")
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    wait(api, first)
    assert submit(api, "second").status_code == 202


def test_drop_after_accept_creates_and_bills_the_job_then_hangs_up(
    sim: Simulator, api: httpx.Client
) -> None:
    sim.update(faults={"drop_after_accept": 1})
    with pytest.raises(httpx.TransportError):
        submit(api, "a lamp", key="line-7")
    jobs = sim.ledger()["jobs"]
    assert len(jobs) == 1 and jobs[0]["dropped"] and jobs[0]["credit_cost"] == 24
    sim.update(faults={"drop_after_accept": 0})
    replay = submit(api, "a lamp", key="line-7")
    assert replay.json()["jobId"] == jobs[0]["id"]
    ledger = sim.ledger()
    assert ledger["submits"] == 1 and ledger["credits_charged"] == {"apiframe": 24}
    assert ledger["requests"]["POST /v2/images/generate dropped"] == 1


def test_truncated_cdn_download_is_a_transport_error(sim: Simulator, api: httpx.Client) -> None:
    url = run(api)["result"]["images"][0]
    sim.update(faults=Faults(cdn_truncated=1))
    with pytest.raises(httpx.RemoteProtocolError):
        HTTP.get(url)
    sim.update(faults=Faults())
    assert decode(HTTP.get(url).content).size == (1024, 1024)
    assert sim.ledger()["requests"]["GET /cdn/images/{name} truncated"] == 1


def test_expired_images_404_by_ttl_and_by_fault(sim: Simulator, api: httpx.Client) -> None:
    sim.update(cdn_ttl_s=0.5)
    job = run(api)
    assert HTTP.get(job["result"]["images"][0]).status_code == 200
    time.sleep(0.55)
    assert api.get(f"/v2/jobs/{job['id']}").json()["expired"] is True
    assert HTTP.get(job["result"]["images"][0]).status_code == 404
    sim.update(cdn_ttl_s=None, faults={"cdn_expired": 1})
    other = run(api, "another")
    assert other["expired"] is False
    assert HTTP.get(other["result"]["images"][0]).status_code == 404
    assert api.get(f"/v2/jobs/{other['id']}").json()["expired"] is True
    assert HTTP.get(f"{sim.base_url}/cdn/images/nope.png").status_code == 404


def test_random_5xx_429_invalid_json_and_slow_faults(sim: Simulator, api: httpx.Client) -> None:
    job_id = submit(api).json()["jobId"]
    sim.update(faults={"error_5xx": 1})
    unavailable = api.get(f"/v2/jobs/{job_id}")
    assert (unavailable.status_code, unavailable.json()) == (503, {"error": "Service unavailable"})
    sim.update(faults={"error_5xx": 0, "error_429": 1})
    limited = api.get(f"/v2/jobs/{job_id}")
    assert (limited.status_code, limited.headers["Retry-After"]) == (429, "1")
    sim.update(faults={"error_429": 0, "invalid_json": 1})
    garbled = [api.get(f"/v2/jobs/{job_id}"), submit(api, "garbled")]
    assert [r.status_code for r in garbled] == [200, 202]
    for response in garbled:
        with pytest.raises(ValueError):
            response.json()
    assert sim.ledger()["submits"] == 1
    sim.update(faults={"invalid_json": 0, "slow": 1, "slow_s": 0.3})
    started = time.monotonic()
    assert api.get("/v2/me").status_code == 200
    assert time.monotonic() - started >= 0.3


def test_fault_draws_are_reproducible_for_a_seed() -> None:
    def statuses() -> list[int]:
        config = SimulatorConfig(faults=Faults(seed=7, error_5xx=0.5))
        with Simulator(config) as simulator:
            url = f"{simulator.base_url}/v2/me"
            return [HTTP.get(url, headers={"X-API-Key": KEY}).status_code for _ in range(20)]

    first = statuses()
    assert first == statuses() and {200, 503} == set(first)


# --- synchronous providers ------------------------------------------------------------------


def test_openai_returns_b64_images_and_usage(sim: Simulator) -> None:
    response = openai(sim, n=2, size="1536x1024", output_format="jpeg", quality="medium")
    assert response.status_code == 200 and response.headers["x-request-id"]
    body = response.json()
    assert body["size"] == "1536x1024" and body["quality"] == "medium"
    assert body["usage"]["output_tokens"] > 0 and "cost" not in str(body)
    images = [decode(base64.b64decode(item["b64_json"])) for item in body["data"]]
    assert [(i.format, i.size) for i in images] == [("JPEG", (1536, 1024))] * 2
    assert sim.ledger()["credits_charged"] == {"openai": 0.1}  # 2 x $0.050 (1536x1024 medium)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input_fidelity": "high"}, "input_fidelity", "unknown_parameter"),
        ({"response_format": "url"}, "response_format", "invalid_value"),
        ({"size": "512x512"}, "size", "invalid_value"),
        ({"n": 11}, "n", "invalid_value"),
        ({"background": "transparent", "output_format": "jpeg"}, "background", "invalid_value"),
        ({"model": "dall-e-3"}, "model", "invalid_value"),
    ],
)
def test_openai_validation_errors(
    sim: Simulator, body: dict[str, Any], param: str, code: str
) -> None:
    response = openai(sim, **body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)


def test_openai_moderation_auth_and_quota(sim: Simulator) -> None:
    blocked = openai(sim, prompt="[[policy]] a poster")
    assert blocked.status_code == 400
    assert blocked.json()["error"]["code"] == "moderation_blocked"
    assert blocked.json()["error"]["type"] == "image_generation_user_error"
    assert blocked.json()["error"]["message"].startswith("Your request was rejected by the safety")
    assert openai(sim, token=None).status_code == 401
    assert openai(sim, token=None).json()["error"]["code"] == "invalid_api_key"
    sim.update(credits=0.1)
    quota = openai(sim)
    assert (quota.status_code, quota.json()["error"]["code"]) == (429, "insufficient_quota")
    assert sim.ledger()["submits"] == 0


def test_aimlapi_urls_b64_and_schema(sim: Simulator) -> None:
    response = aimlapi(sim)
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "image" and body["model"] == "openai/gpt-image-1-5"
    assert body["meta"]["usage"]["credits_used"] == cost("aimlapi") == 88.4
    image = decode(HTTP.get(body["data"][0]["url"]).content)
    assert (image.format, image.size) == ("PNG", (1024, 1024))
    inline = aimlapi(sim, response_format="b64_json", size="1024x1536", output_format="webp")
    image = decode(base64.b64decode(inline.json()["data"][0]["b64_json"]))
    assert (image.format, image.size) == ("WEBP", (1024, 1536))
    for bad in ({"n": 2}, {"quality": "auto"}, {"size": "auto"}, {"model": "gpt-image-1.5"}):
        assert aimlapi(sim, **bad).status_code == 400, bad
    assert aimlapi(sim, n=1.0).status_code == 200
    sim.update(credits=100)
    assert aimlapi(sim, quality="high").status_code == 402


def test_omixa_b64_billed_amount_and_422(sim: Simulator) -> None:
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    response = omixa(sim, input_images=[part], input_fidelity="auto", size="auto")
    assert response.status_code == 200
    body = response.json()
    assert body["usage"] == {"billed_amount": "0.039000"} and body["data"][0]["url"] is None
    assert decode(base64.b64decode(body["data"][0]["b64_json"])).size == (1024, 1024)
    for bad in ({"input_images": ["http://a/b.png"]}, {"response_format": "url"}, {"n": 0}):
        invalid = omixa(sim, **bad)
        assert invalid.status_code == 422, bad
        assert invalid.json()["error"]["type"] == "invalid_request_error"
    sim.update(credits=0.05)
    refused = omixa(sim, quality="high")
    assert refused.status_code == 402
    assert refused.json()["error"] == {
        "message": "Insufficient wallet balance.",
        "type": "billing_error",
        "code": "insufficient_balance",
    }


def test_oxen_urls_b64_and_errors(sim: Simulator) -> None:
    response = oxen(sim, size="landscape", input_image=["https://example.com/a.png"])
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "gpt-image-1-5" and set(body) == {"model", "created", "images"}
    assert decode(HTTP.get(body["images"][0]["url"]).content).size == (1536, 1024)
    inline = oxen(sim, response_format="b64_json", output_format="webp", n=2)
    assert len(inline.json()["images"]) == 2
    assert decode(base64.b64decode(inline.json()["images"][0]["b64_json"])).format == "WEBP"
    empty = oxen(sim, prompt="")
    assert (empty.status_code, empty.json()) == (400, {"error": "Prompt cannot be empty"})
    assert oxen(sim, model="flux").json() == {"error": "Model 'flux' not found"}
    assert oxen(sim, size="1024x1024").status_code == 400
    assert sync(sim, "oxen", "/api/ai/images/generate", {}, token=None).status_code == 401
    sim.update(credits=0.05)
    assert oxen(sim, n=2).status_code == 402
    assert sim.ledger()["credits_charged"] == {"oxen": cost("oxen", n=3)}


def test_sync_drop_after_accept_bills_then_hangs_up(sim: Simulator) -> None:
    sim.update(faults={"drop_after_accept": 1})
    with pytest.raises(httpx.TransportError):
        omixa(sim, prompt="a chair")
    (job,) = sim.ledger()["jobs"]
    assert job["provider"] == "omixa" and job["dropped"] and job["credit_cost"] == 0.039


def test_sync_markers(sim: Simulator) -> None:
    first = oxen(sim, prompt="[[fail-once]] x")
    assert first.status_code == 502 and oxen(sim, prompt="[[fail-once]] x").status_code == 200
    started = time.monotonic()
    assert openai(sim, prompt="[[slow]] x").status_code == 200
    assert time.monotonic() - started >= 0.1
    corrupt = aimlapi(sim, prompt="[[corrupt]] x").json()["data"][0]["url"]
    with pytest.raises(UnidentifiedImageError):
        decode(HTTP.get(corrupt).content)
    with pytest.raises(httpx.ReadTimeout):
        HTTP.post(
            sim.url_for("openai") + "/v1/images/generations",
            json={"model": "gpt-image-1.5", "prompt": "[[never-finish]]"},
            headers={"Authorization": "Bearer sk-test"},
            timeout=0.3,
        )


# --- control API, ledger and config ---------------------------------------------------------


def test_control_endpoints_and_ledger_totals(sim: Simulator, api: httpx.Client) -> None:
    control = httpx.Client(base_url=f"{sim.base_url}/_sim", timeout=5)
    assert control.get("/health").json() == {"status": "ok"}
    changed = control.post("/config", json={"credits": 100, "faults": {"seed": 3}}).json()
    assert changed["credits"] == 100 and changed["faults"]["seed"] == 3
    assert sim.config.faults.seed == 3 and sim.config.latency_s == 0.2
    assert control.post("/config", json={"latency": 1}).status_code == 400
    assert control.post("/config", json={"faults": {"error_5xx": 2}}).status_code == 400
    run(api, quality="low")
    run(api, "[[policy]]", quality="medium")
    openai(sim, quality="low")
    ledger = control.get("/ledger").json()
    assert ledger == sim.ledger()
    assert ledger["submits"] == 3
    assert ledger["credits_charged"] == {"apiframe": 13, "openai": 0.009}
    assert ledger["credits_refunded"] == {"apiframe": 9}
    assert ledger["credits_remaining"]["apiframe"] == 96
    assert ledger["requests"]["POST /v2/images/generate 202"] == 2
    assert ledger["requests"]["POST /openai/v1/images/generations 200"] == 1
    assert [j["provider"] for j in ledger["jobs"]] == ["apiframe", "apiframe", "openai"]
    assert control.post("/reset").json() == {"status": "reset"}
    assert sim.ledger()["submits"] == 0 and sim.ledger()["requests"] == {}
    control.close()


def test_url_layout_and_lifecycle() -> None:
    simulator = Simulator(SimulatorConfig(latency_s=0.1))
    with pytest.raises(RuntimeError):
        _ = simulator.base_url
    with simulator:
        assert simulator.base_url.startswith("http://127.0.0.1:")
        assert simulator.url_for("apiframe") == simulator.url_for("simulator") == simulator.base_url
        assert simulator.url_for("oxen") == simulator.base_url + "/oxen"
        with pytest.raises(ValueError):
            simulator.url_for("bfl")
        with pytest.raises(ValueError):
            simulator.update(port=1)
        url = simulator.base_url
    with pytest.raises(httpx.ConnectError):
        HTTP.get(f"{url}/_sim/health")


def test_config_mapping_round_trip_and_checks() -> None:
    config = SimulatorConfig.from_mapping(
        {"latency_s": 1, "credits": None, "faults": {"error_5xx": 0.25}, "result_shape": "string"}
    )
    assert config.latency_s == 1.0 and config.faults.error_5xx == 0.25
    assert SimulatorConfig.from_mapping(config.to_dict()) == config
    merged = SimulatorConfig.from_mapping({"faults": {"slow": 1}}, base=config)
    assert merged.faults == Faults(error_5xx=0.25, slow=1)
    for bad in (
        {"nope": 1},
        {"latency_s": True},
        {"latency_s": "1"},
        {"port": 1.5},
        {"result_shape": "list"},
        {"faults": {"error_429": 1.5}},
        {"faults": 3},
        {"max_in_flight": 0},
        {"image_mode": "huge"},
        {"webhook_retries": -1},
        {"webhook_retries": 1.0},
        {"webhook_timeout_s": 0},
        {"sync_latency_jitter_s": -1},
        {"faults": {"cdn_lag": 2}},
        {"faults": {"webhook_drop": -0.1}},
    ):
        with pytest.raises(ValueError):
            SimulatorConfig.from_mapping(bad)


def test_new_settings_and_faults_go_through_the_control_api(sim: Simulator) -> None:
    settings = {
        "image_mode": "tiny",
        "sync_latency_jitter_s": 0.01,
        "webhook_timeout_s": 1,
        "webhook_retries": 1,
        "webhook_backoff_s": 0.1,
        "faults": {"cdn_lag": 0.5, "webhook_drop": 0.1, "webhook_duplicate": 0.2},
    }
    changed = HTTP.post(f"{sim.base_url}/_sim/config", json=settings).json()
    assert changed["image_mode"] == "tiny" and changed["webhook_retries"] == 1
    assert changed["faults"] | settings["faults"] == changed["faults"]
    assert sim.config.faults == Faults(cdn_lag=0.5, webhook_drop=0.1, webhook_duplicate=0.2)
    assert Faults.from_mapping({"cdn_lag": 1}).cdn_lag == 1  # what `simulate --faults` parses
    ledger = sim.ledger()
    assert ledger["webhooks"] == {"sent": 0, "delivered": 0, "failed": 0, "dropped": 0}
    assert ledger["rate_limited"] == {"concurrency": 0, "rate": 0, "read_rate": 0, "fault": 0}
    assert ledger["rate_limited_by_provider"] == {}
