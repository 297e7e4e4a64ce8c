"""The APIFrame adapter's HTTP edge cases, with scripted responses (httpx.MockTransport)."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest
from pydantic import SecretStr

from jobs.errors import (
    AmbiguousSubmit,
    BatchStop,
    JobFailed,
    PermanentProviderError,
    TransientProviderError,
)
from jobs.manifest.request import ImageRequest
from jobs.providers.apiframe import APIFrame
from jobs.providers.base import Finished, Pending, Submitted
from jobs.settings import ProviderConfig

KEY = "afk_secret_key_123"
CONFIG = ProviderConfig("apiframe", "https://api.test", SecretStr(KEY), 4, 10.0, 5.0)


def adapter(handler: Callable[[httpx.Request], httpx.Response]) -> APIFrame:
    return APIFrame(CONFIG, httpx.Client(transport=httpx.MockTransport(handler)))


def request(**fields: object) -> ImageRequest:
    return ImageRequest.model_validate({"prompt": "a fox", **fields})


def test_common_fields_map_to_gpt_image_params() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(202, json={"jobId": "job-1", "status": "QUEUED"})

    outcome = adapter(handler).submit(
        request(
            size="1536x1024",
            n=3,
            quality="medium",
            output_format="png",
            background="opaque",
            input_images=["https://x.test/a.png"],
        ),
        "key-1",
    )
    assert outcome == Submitted("job-1")
    sent = seen[0]
    assert sent.headers["X-API-Key"] == KEY
    assert sent.headers["Idempotency-Key"] == "key-1"
    assert json.loads(sent.content) == {
        "model": "gpt-image-1.5",
        "prompt": "a fox",
        "gptImageParams": {
            "number_of_images": 3,
            "aspect_ratio": "3:2",
            "quality": "medium",
            "output_format": "png",
            "background": "opaque",
            "input_images": ["https://x.test/a.png"],
        },
    }


def test_provider_params_reach_the_params_block_but_never_replace_a_priced_field() -> None:
    seen: list[httpx.Request] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(req)
        return httpx.Response(202, json={"jobId": "job-1", "status": "QUEUED"})

    line = request(
        n=1, quality="low", provider_params={"number_of_images": 10, "quality": "high", "seed": 7}
    )
    api = adapter(handler)
    assert [field for field, _ in api.validate(line)] == ["provider_params", "provider_params"]
    api.submit(line, "key-1")  # as if validation had been skipped
    assert json.loads(seen[0].content)["gptImageParams"] == {
        "number_of_images": 1,
        "quality": "low",
        "seed": 7,
    }


@pytest.mark.parametrize(
    ("result", "urls"),
    [
        ("https://cdn.test/a.png", ["https://cdn.test/a.png"]),
        (
            {"images": ["https://cdn.test/a.png", "https://cdn.test/b.png"]},
            ["https://cdn.test/a.png", "https://cdn.test/b.png"],
        ),
        ({"images": [{"url": "https://cdn.test/c.png"}]}, ["https://cdn.test/c.png"]),
    ],
)
def test_both_result_shapes_are_read(result: object, urls: list[str]) -> None:
    job = {"id": "j", "status": "COMPLETED", "result": result, "creditCost": 24}
    outcome = adapter(lambda _: httpx.Response(200, json=job)).poll("j")
    assert isinstance(outcome, Finished)
    assert [a.url for a in outcome.artifacts] == urls
    assert outcome.credits == 24


def test_queued_processing_and_unknown_statuses_are_pending() -> None:
    for status in ("QUEUED", "PROCESSING", "WARMING_UP"):
        job = {"id": "j", "status": status, "progress": 40}

        def reply(_: httpx.Request, j: dict[str, int | str] = job) -> httpx.Response:
            return httpx.Response(200, json=j)

        assert adapter(reply).poll("j") == Pending(status, 40)


def test_failed_jobs_are_classified_by_reason() -> None:
    def poll(error: str) -> JobFailed:
        job = {"id": "j", "status": "FAILED", "error": error, "creditCost": 0}
        with pytest.raises(JobFailed) as info:
            adapter(lambda _: httpx.Response(200, json=job)).poll("j")
        return info.value

    assert poll("Upstream provider timeout").retryable
    policy = poll("Content policy violation: weapons")
    assert not policy.retryable and policy.type == "content_policy"
    job = {"id": "j", "status": "CANCELLED"}
    with pytest.raises(JobFailed) as info:
        adapter(lambda _: httpx.Response(200, json=job)).poll("j")
    assert not info.value.retryable


def test_429_carries_retry_after_and_is_transient() -> None:
    response = httpx.Response(429, headers={"Retry-After": "7"}, json={"error": "Rate limit"})
    with pytest.raises(TransientProviderError) as info:
        adapter(lambda _: response).submit(request(), "k")
    assert info.value.retry_after == 7


def test_402_stops_the_batch_and_401_too() -> None:
    body = {"error": "Insufficient credits", "creditsRequired": 24, "creditsAvailable": 3}
    with pytest.raises(BatchStop) as info:
        adapter(lambda _: httpx.Response(402, json=body)).submit(request(), "k")
    assert info.value.type == "insufficient_credits"
    with pytest.raises(BatchStop) as info:
        adapter(lambda _: httpx.Response(401, json={"error": "Invalid API key"})).submit(
            request(), "k"
        )
    assert info.value.type == "auth"


def test_400_is_permanent_and_keeps_the_providers_reason() -> None:
    body = {"error": "Unknown field gptImageParams.foo"}
    with pytest.raises(PermanentProviderError, match="Unknown field"):
        adapter(lambda _: httpx.Response(400, json=body)).submit(request(), "k")


def test_a_connection_lost_after_sending_a_submit_is_ambiguous() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("Server disconnected", request=req)

    with pytest.raises(AmbiguousSubmit):
        adapter(handler).submit(request(), "k")


def test_a_refused_connection_is_plainly_transient() -> None:
    def handler(req: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("refused", request=req)

    with pytest.raises(TransientProviderError) as info:
        adapter(handler).submit(request(), "k")
    assert not isinstance(info.value, AmbiguousSubmit)


def test_malformed_json_is_retryable_and_ambiguous_on_submit() -> None:
    garbage = httpx.Response(202, content=b"<html>oops")
    with pytest.raises(AmbiguousSubmit):
        adapter(lambda _: garbage).submit(request(), "k")
    with pytest.raises(TransientProviderError):
        adapter(lambda _: httpx.Response(200, content=b"{not json")).poll("j")


def test_validation_names_what_apiframe_cannot_do() -> None:
    frame = adapter(lambda _: httpx.Response(500))
    assert frame.validate(request()) == []
    assert frame.validate(request(prompt="x" * 2001))[0][0] == "prompt"
    assert (
        frame.validate(request(model="gpt-image-2", background="transparent"))[0][0] == "background"
    )
    assert frame.validate(request(output_compression=50))[0][0] == "output_compression"
    assert frame.estimate(request(n=3, quality="medium")) == 27
