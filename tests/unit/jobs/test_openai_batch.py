"""The ``openai-batch`` adapter and the durable group record, without Redis: each line of a
batch's output or error file classified as the synchronous endpoint's answer would be, a
line's cost at half the list price of what was drawn, input lines OpenAI's documented shape
accepts, and which lines a resume puts back into which saved group."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource

from jobs.errors import PermanentProviderError, TransientProviderError
from jobs.manifest.request import ImageRequest
from jobs.output import groups
from jobs.providers.openai_batch import OpenAIBatch
from jobs.providers.openai_batch_objects import input_line
from jobs.registry import REGISTRY
from jobs.settings import ProviderConfig, Settings
from jobs.storage import LocalStore
from tests.harness import SCHEMAS
from worker.lines.groups import custom_id, parse_custom_id


@pytest.fixture
def adapter() -> Iterator[OpenAIBatch]:
    made = OpenAIBatch(ProviderConfig("openai-batch", "http://127.0.0.1:9", None, 4, 2.0, 30.0))
    yield made
    made.close()


def error_line(status: int, error: dict[str, Any]) -> dict[str, Any]:
    body = {"error": {"message": "x", "type": "invalid_request_error", "param": None} | error}
    return {
        "id": "batch_req_1",
        "custom_id": "4:1:cup-4",
        "response": {"status_code": status, "request_id": "req_1", "body": body},
        "error": None,
    }


def test_an_output_line_has_the_images_and_its_request_id(adapter: OpenAIBatch) -> None:
    body = {"data": [{"b64_json": "iVBORw0KGgo="}], "size": "1024x1024", "quality": "low"}
    item = {
        "id": "batch_req_9",
        "custom_id": "4:1:cup-4",
        "response": {"status_code": 200, "request_id": "req_9", "body": body},
        "error": None,
    }

    result = adapter.result(item)

    assert (result.custom_id, result.request_id, result.error) == ("4:1:cup-4", "batch_req_9", None)
    assert result.body == body


@pytest.mark.parametrize(
    ("status", "error", "kind", "retryable"),
    [
        (
            400,
            {"code": "moderation_blocked", "message": "rejected by the safety system"},
            "content_policy",
            False,
        ),
        (
            400,
            {"code": "unknown_parameter", "message": "Unknown parameter: 'style'."},
            "provider_rejected",
            False,
        ),
        (401, {"code": "invalid_api_key", "message": "bad key"}, "auth", False),
        (429, {"code": "rate_limit_exceeded", "message": "slow down"}, "rate_limited", True),
        (
            500,
            {"type": "server_error", "message": "The server had an error"},
            "provider_unavailable",
            True,
        ),
    ],
)
def test_an_error_line_is_classified_as_the_synchronous_answer_would_be(
    adapter: OpenAIBatch, status: int, error: dict[str, Any], kind: str, retryable: bool
) -> None:
    result = adapter.result(error_line(status, error))

    assert result.body is None and result.error is not None
    assert (result.error.type, result.error.retryable) == (kind, retryable)
    assert str(status) in result.error.message
    assert isinstance(result.error, TransientProviderError if retryable else PermanentProviderError)


@pytest.mark.parametrize("code", ["batch_expired", "batch_cancelled"])
def test_a_request_the_batch_never_ran_may_run_later(adapter: OpenAIBatch, code: str) -> None:
    item = {
        "id": "r",
        "custom_id": "1:2:a",
        "response": None,
        "error": {"code": code, "message": "m"},
    }

    result = adapter.result(item)

    assert result.error is not None and result.error.retryable and result.error.type == code


def test_a_line_costs_half_the_list_price_of_what_was_drawn(adapter: OpenAIBatch) -> None:
    auto = ImageRequest(prompt="x", quality="auto", n=2)
    drawn = {"size": "1536x1024", "quality": "high"}

    assert adapter.cost(auto, drawn, 2) == pytest.approx(0.2)  # 2 x 0.200 / 2
    assert adapter.cost(ImageRequest(prompt="x", quality="low"), {}, 1) == pytest.approx(0.0045)
    free = ImageRequest(prompt="x", model="gpt-image-2", size="2048x1152")
    assert adapter.cost(free, {"size": "2048x1152"}, 1) == 0.0  # not published: not guessed
    assert adapter.estimate(ImageRequest(prompt="x", quality="medium", n=3)) == pytest.approx(0.051)


def test_its_prices_are_half_of_openai_s_and_it_is_never_pooled_by_auto() -> None:
    batch, sync = REGISTRY["openai-batch"], REGISTRY["openai"]
    assert batch.group and batch.same_account_as == "openai"
    for quality, price in sync.prices.per_image.items():
        assert batch.prices.per_image[quality] == pytest.approx(price / 2)


def test_it_uses_the_openai_key_and_base_url_unless_its_own_are_set() -> None:
    shared = Settings(_env_file=None, openai_api_key="sk-shared", openai_base_url="http://o")  # type: ignore[call-arg]
    config = shared.provider_config("openai-batch")
    assert config.api_key is not None and config.api_key.get_secret_value() == "sk-shared"
    assert config.base_url == "http://o"
    own = Settings(  # type: ignore[call-arg]
        _env_file=None,
        openai_api_key="sk-shared",
        openai_batch_api_key="sk-own",
        openai_batch_base_url="http://b",
    )
    config = own.provider_config("openai-batch")
    assert config.api_key is not None and config.api_key.get_secret_value() == "sk-own"
    assert config.base_url == "http://b"
    assert Settings(_env_file=None).provider_config("openai-batch").base_url == (  # type: ignore[call-arg]
        "https://api.openai.com"
    )


def test_its_group_settings_have_openai_s_limits_and_the_fallback_is_opt_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    default = Settings(_env_file=None).group_config("openai-batch")  # type: ignore[call-arg]
    assert default.size == 10_000 and default.poll_s >= 60 and default.fallback is None
    assert default.max_bytes == 200 * 1024 * 1024
    monkeypatch.setenv("IMAGEBATCH_OPENAI_BATCH_GROUP_SIZE", "500")
    monkeypatch.setenv("IMAGEBATCH_OPENAI_BATCH_POLL_S", "0.5")
    monkeypatch.setenv("IMAGEBATCH_OPENAI_BATCH_FALLBACK", "true")
    config = Settings(_env_file=None).group_config("openai-batch")  # type: ignore[call-arg]
    assert (config.size, config.poll_s, config.fallback) == (500, 0.5, "openai")
    monkeypatch.setenv("IMAGEBATCH_OPENAI_BATCH_GROUP_SIZE", "50001")
    with pytest.raises(ValueError, match="50000"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_its_input_lines_have_the_documented_shape(adapter: OpenAIBatch) -> None:
    schemas = [json.loads((SCHEMAS / f"{n}.json").read_text()) for n in ("openai", "openai-batch")]
    registry: Registry[Any] = Registry().with_resources(
        (s["$id"], Resource.from_contents(s)) for s in schemas
    )
    validator = Draft202012Validator(schemas[1], registry=registry)
    requests = [
        ImageRequest(prompt="a cup", quality="low", size="1536x1024", n=2),
        ImageRequest(prompt="a cup", model="gpt-image-2", size="2048x1152", output_format="jpeg"),
        ImageRequest(prompt="a cup", background="transparent", output_format="webp"),
    ]
    for k, request in enumerate(requests):
        line = json.loads(input_line(custom_id(k, 1, f"cup-{k}"), adapter.body(request)))
        assert list(validator.iter_errors(line)) == [], line
    wrong = json.loads(input_line("1:1:x", {"model": "gpt-image-1.5", "prompt": "x", "seed": 1}))
    assert list(validator.iter_errors(wrong))


def test_a_custom_id_names_the_line_and_its_attempt() -> None:
    assert parse_custom_id(custom_id(41, 3, "sku-1001.mug")) == (41, 3)
    assert parse_custom_id("request-1") is None


# -- the durable record and what a resume takes from it ---------------------------------------


def saved(store: LocalStore, group: str, members: list[tuple[int, int]], **create: Any) -> None:
    record = groups.GroupFile(group, "b1", "openai-batch", "gpt-image-1.5", members, 1.0)
    record.creates.append(groups.Create(1, **create))
    groups.write(store, record)


def test_a_resume_puts_each_unsettled_line_back_into_its_latest_group(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    saved(store, "g1", [(0, 1), (1, 1), (2, 1), (3, 1)], job_id="batch_1", status="completed")
    saved(store, "g2", [(2, 2), (5, 1)])  # its create's answer was never saved
    rows = {0}  # line 0 has a row (succeeded): it stays out
    failed = {3: 1}  # line 3 failed at attempt 1: a resume retries it afresh

    found = groups.adoptions(store, "b1", rows.__contains__, lambda i: failed.get(i, 0))

    by_group = {a.record.group: a.members for a in found}
    assert by_group == {"g1": [(1, 1)], "g2": [(2, 2), (5, 1)]}
    assert {a.record.group: a.record.job_id for a in found} == {"g1": "batch_1", "g2": None}


def test_the_record_counts_the_jobs_that_ran_and_those_refused(tmp_path: Path) -> None:
    store = LocalStore(str(tmp_path))
    record = groups.GroupFile("g1", "b1", "openai-batch", "m", [(0, 1)], 1.0)
    record.creates = [
        groups.Create(1, "batch_a", "failed", refused=groups.REFUSED),
        groups.Create(2, "batch_b", "completed"),
    ]
    groups.write(store, record)
    saved(store, "g2", [(1, 1)], job_id="batch_c")

    assert groups.jobs_used(store, "b1") == (2, 1)
    again = groups.read(store, "b1", "g1")
    assert again == record
