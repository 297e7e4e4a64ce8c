"""Input hygiene: a line that is ambiguous, too deep, points the provider at a private
address or overrides a priced field is rejected on its own, the lines after it are still
read, and nothing echoed from a line can flood or colour a terminal."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import httpx
import pytest

from jobs.errors import TransientProviderError
from jobs.manifest.parse import Line, ProviderCheck, read_manifest, rejected_row_fields
from jobs.manifest.request import ImageRequest
from jobs.output.rows import ResultRow
from jobs.providers import build
from jobs.providers.base import Provider
from jobs.providers.http import check, retry_after
from jobs.settings import Settings

NEXT = b'{"prompt": "the line after", "id": "after"}'
PROVIDERS = ("apiframe", "openai", "aimlapi", "omixa", "oxen")


def read(line: bytes, check: ProviderCheck | None = None) -> list[Line]:
    """The line, then a good one: both must come out, the first rejected."""
    return list(read_manifest([line + b"\n" + NEXT + b"\n"], check))


def rejection_of(line: bytes, check: ProviderCheck | None = None) -> tuple[str | None, str]:
    first, after = read(line, check)
    assert after.request is not None and after.number == 2, after
    assert first.request is None and first.rejection is not None, f"accepted: {first.request}"
    assert first.rejection.line == 1
    return first.rejection.field, first.rejection.message


def row_json(line: Line) -> str:
    """The rejected line's result row, serialised as the worker stores it."""
    assert line.rejection is not None
    row = ResultRow.model_validate(
        {
            "line": line.number,
            "id": line.id,
            "status": "rejected",
            "error": line.rejection.as_row_error(),
            **rejected_row_fields(line),
        }
    )
    return row.model_dump_json()


# -- 1. duplicate keys ----------------------------------------------------------------------------


def test_a_line_with_a_duplicate_key_is_rejected_as_ambiguous() -> None:
    line = b'{"prompt": "a", "size": "1024x1024", "size": "1536x1024"}'
    assert rejection_of(line) == ("size", "duplicate field 'size' (the line is ambiguous)")


@pytest.mark.parametrize(
    ("line", "field", "where"),
    [
        (b'{"prompt": "a", "metadata": {"sku": "1", "sku": "2"}}', "metadata", "metadata.sku"),
        (
            b'{"prompt": "a", "provider_params": {"style": {"k": 1, "k": 2}}}',
            "provider_params",
            "provider_params.style.k",
        ),
        (
            b'{"prompt": "a", "metadata": {"tags": [{"t": 1}, {"t": 2, "t": 3}]}}',
            "metadata",
            "metadata.tags[1].t",
        ),
    ],
)
def test_a_duplicate_key_in_a_nested_object_is_rejected_naming_where(
    line: bytes, field: str, where: str
) -> None:
    assert rejection_of(line) == (field, f"duplicate field '{where}' (the line is ambiguous)")


def test_the_same_key_in_two_different_objects_is_not_a_duplicate() -> None:
    line = b'{"prompt": "a", "metadata": {"a": {"k": 1}, "b": {"k": 2}, "k": 3}}'
    first, _ = read(line)
    assert first.request is not None
    assert first.request.metadata == {"a": {"k": 1}, "b": {"k": 2}, "k": 3}


# -- 2. nesting depth -----------------------------------------------------------------------------


def nested(depth: int, leaf: str = "1") -> str:
    return '{"a": ' * depth + leaf + "}" * depth


@pytest.mark.parametrize("depth", [33, 900, 5000])
def test_a_line_nested_too_deep_is_rejected_and_the_next_lines_are_still_read(depth: int) -> None:
    line = f'{{"prompt": "deep", "metadata": {nested(depth)}}}'.encode()
    first, after = read(line)
    assert after.request is not None and after.number == 2
    assert first.rejection is not None, "a too-deep line was accepted"
    assert "nested deeper than 32 levels" in first.rejection.message
    if depth < 1000:  # json.loads itself gives up before 1000 levels: the field is unknown
        assert first.rejection.field == "metadata"
        assert first.rejection.message == "metadata is nested deeper than 32 levels"
    json.loads(row_json(first))  # its result row can still be written


def test_deep_lists_in_provider_params_are_rejected_too() -> None:
    line = b'{"prompt": "deep", "provider_params": {"x": ' + b"[" * 900 + b"]" * 900 + b"}}"
    field, reason = rejection_of(line)
    assert (field, reason) == ("provider_params", "provider_params is nested deeper than 32 levels")


def test_metadata_at_the_nesting_limit_is_accepted_and_copied() -> None:
    line = f'{{"prompt": "deep", "metadata": {nested(32)}}}'.encode()
    first, _ = read(line)
    assert first.request is not None, first.rejection
    assert first.request.metadata == json.loads(nested(32))
    assert '"a"' in first.request.model_dump_json()


# -- 3. what a reason echoes ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "x" * 900_000},
        {"prompt": "p", "size": "s" * 900_000},
        {"prompt": "p", "quality": ["high"] * 100_000},
        {"prompt": "p", "input_images": ["ftp://" + "x" * 900_000]},
    ],
    ids=["prompt", "size", "quality-list", "input-image"],
)
def test_a_huge_value_is_not_echoed_in_full_in_its_rejection(fields: dict[str, Any]) -> None:
    field, reason = rejection_of(json.dumps(fields).encode())
    assert field in fields
    assert len(reason) < 400, f"{len(reason)} characters: {reason[:200]}..."
    assert "more characters)" in reason or "...]" in reason  # cut text, or an elided list


def test_an_over_long_prompt_says_how_much_was_left_out() -> None:
    _, reason = rejection_of(json.dumps({"prompt": "x" * 900_000}).encode())
    assert reason.startswith("prompt '" + "x" * 120 + "… (899,880 more characters)'")
    assert "at most 32000 characters" in reason


ESC = "\x1b[31mred\nevil.jsonl:99: rejected: forged\r\x9b2J"


@pytest.mark.parametrize(
    "line",
    [
        b'{"prompt": "p", "\\u001b[31m\\n": 1, "\\u001b[31m\\n": 2}',
        json.dumps({"prompt": "p", "size": ESC}).encode(),
        json.dumps({"prompt": "p", ESC: 1}).encode(),
        json.dumps({"prompt": "p", "input_images": [f"http://127.0.0.1/{ESC}"]}).encode(),
        json.dumps({"prompt": "p", "input_images": [f"gopher://{ESC}"]}).encode(),
        b'{"prompt": "p", "metadata": {"\\u001b[31m": ' + nested(40).encode() + b"}}",
    ],
    ids=["duplicate-key", "value", "unknown-field", "private-url", "bad-scheme", "deep"],
)
def test_control_characters_from_a_line_never_reach_the_reason_raw(line: bytes) -> None:
    _, reason = rejection_of(line)
    assert reason.isprintable(), repr(reason)
    assert "\x1b" not in reason and "\n" not in reason and "\x9b" not in reason


# -- 4. input_images the provider can never fetch -------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://10.0.0.5/a.png", "private"),
        ("https://192.168.1.20/a.png", "private"),
        ("http://172.16.0.1:8080/a.png", "private"),
        ("http://127.0.0.1/x", "loopback"),
        ("http://127.1/x", "loopback"),
        ("http://2130706433/x", "loopback"),
        ("http://0x7f.0.0.1/x", "loopback"),
        ("http://[::1]/x", "loopback"),
        ("http://[::ffff:10.0.0.5]/x", "private"),
        ("http://169.254.169.254/latest", "link-local"),
        ("http://[fe80::1]/x", "link-local"),
        ("http://0.0.0.0/x", "unspecified"),
        ("http://100.64.0.1/x", "non-global"),
        ("http://224.0.0.251/x", "multicast"),
        ("http://localhost/x", "loopback"),
        ("http://LocalHost./x", "loopback"),
        ("http://img.localhost:9000/x", "loopback"),
        ("http://user@127.0.0.1/x", "loopback"),
        ("http://%31%32%37.0.0.1/x", "loopback"),
        ("http://\uff11\uff12\uff17.0.0.1/x", "loopback"),  # full-width digits
    ],
)
def test_an_input_image_on_a_private_address_is_rejected_naming_the_entry(
    url: str, kind: str
) -> None:
    line = json.dumps({"prompt": "p", "input_images": [url]}).encode()
    field, reason = rejection_of(line)
    assert field == "input_images"
    assert reason.startswith("input_images[0]: "), reason
    assert reason.endswith(f"is a {kind} address the provider cannot reach"), reason


def test_the_reason_names_which_input_image_is_unreachable() -> None:
    urls = ["https://images.example.com/a.png", "http://10.0.0.5/a.png"]
    _, reason = rejection_of(json.dumps({"prompt": "p", "input_images": urls}).encode())
    assert (
        reason
        == "input_images[1]: http://10.0.0.5/… is a private address the provider cannot reach"
    )


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1\\@images.example.com/a.png",
        "http://images.example.com /a.png",
        "http:///a.png",
    ],
)
def test_an_input_image_url_that_parsers_read_differently_is_rejected(url: str) -> None:
    line = json.dumps({"prompt": "p", "input_images": [url]}).encode()
    field, reason = rejection_of(line)
    assert field == "input_images" and reason.startswith("input_images[0]: "), reason


@pytest.mark.parametrize(
    "url",
    [
        "https://images.example.com/ref-1.png",
        "http://8.8.8.8/a.png",
        "http://[2001:4860:4860::8888]/a.png",
        "https://localhost.example.com/a.png",
        "https://cdn.test/a.png?sig=abc&x=1",
        "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAE=",
    ],
)
def test_a_public_or_inline_input_image_is_accepted_without_dns(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_dns(*args: object, **kwargs: object) -> None:
        raise AssertionError("validation looked a host name up")

    monkeypatch.setattr("socket.getaddrinfo", no_dns)
    monkeypatch.setattr("socket.gethostbyname", no_dns)
    first, _ = read(json.dumps({"prompt": "p", "input_images": [url]}).encode())
    assert first.request is not None, first.rejection
    assert first.request.input_images == [url]


# -- 5. Retry-After -------------------------------------------------------------------------------


def answer(retry: str | None) -> httpx.Response:
    headers = {} if retry is None else {"Retry-After": retry}
    return httpx.Response(429, headers=headers, request=httpx.Request("POST", "https://p.test"))


@pytest.mark.parametrize(
    "value", ["soon", "", "   ", "Mon, 99 Foo 2025 99:99:99 GMT", "nan", "inf", "1e999", "5 s"]
)
def test_an_unparseable_retry_after_means_no_hint(value: str) -> None:
    assert retry_after(answer(value)) is None


def test_a_429_with_a_garbage_retry_after_is_still_a_retryable_provider_error() -> None:
    with pytest.raises(TransientProviderError) as caught:
        check(answer("soon"), "apiframe")
    assert caught.value.retry_after is None and caught.value.status == 429


@pytest.mark.parametrize(
    ("value", "seconds"), [("120", 120.0), ("0", 0.0), ("-5", 0.0), (None, None)]
)
def test_retry_after_in_seconds_still_works(value: str | None, seconds: float | None) -> None:
    assert retry_after(answer(value)) == seconds


def test_retry_after_as_an_http_date_still_works() -> None:
    later = datetime.now(UTC) + timedelta(seconds=30)
    wait = retry_after(answer(format_datetime(later, usegmt=True)))
    assert wait is not None and 25 <= wait <= 31
    assert retry_after(answer("Wed, 21 Oct 2015 07:28:00 GMT")) == 0.0
    assert retry_after(answer("Wed, 21 Oct 2015 07:28:00 -0000")) == 0.0


# -- 7. provider_params may not override a priced, mapped field ----------------------------------


@pytest.fixture(scope="module")
def offline() -> Iterator[dict[str, Provider]]:
    """Adapters as ``plan`` builds them: no key, no network."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    adapters = {name: build(name, settings) for name in PROVIDERS}
    yield adapters
    for adapter in adapters.values():
        adapter.close()


APIFRAME_KEYS = {
    "number_of_images": "n",
    "quality": "quality",
    "aspect_ratio": "size",
    "output_format": "output_format",
    "background": "background",
    "input_images": "input_images",
    "input_fidelity": "input_fidelity",
    "moderation": "moderation",
    "model": "model",
    "prompt": "prompt",
    "webhookUrl": None,
    "webhookEvents": None,
}
SYNC_KEYS = {
    "model": "model",
    "prompt": "prompt",
    "n": "n",
    "size": "size",
    "quality": "quality",
    "background": "background",
    "output_format": "output_format",
    "output_compression": "output_compression",
    "moderation": "moderation",
    "input_fidelity": "input_fidelity",
    "input_images": "input_images",
    "input_image": "input_images",
    "response_format": None,
    "stream": None,
    "partial_images": None,
}
OVERRIDES = [("apiframe", key, field) for key, field in APIFRAME_KEYS.items()] + [
    (provider, key, field) for provider in PROVIDERS[1:] for key, field in SYNC_KEYS.items()
]
RULE = "(provider_params may not override a field imagebatch prices and maps)"
BUILT_HERE = ("apiframe", "openai", "aimlapi", "omixa")
"""Adapters whose body is built here; Oxen builds its own (and is checked by validate())."""


@pytest.mark.parametrize(("provider", "key", "field"), OVERRIDES)
def test_provider_params_may_not_override_a_field_the_adapter_sets(
    offline: dict[str, Provider], provider: str, key: str, field: str | None
) -> None:
    problems = offline[provider].validate(
        ImageRequest.model_validate({"prompt": "p", "provider_params": {key: 10}})
    )
    if field is None:
        expected = f"provider_params.{key}: imagebatch controls it {RULE}"
    else:
        expected = (
            f"provider_params.{key}: set it with the manifest's own field '{field}' instead {RULE}"
        )
    assert problems[:1] == [("provider_params", expected)], problems


@pytest.mark.parametrize("provider", PROVIDERS)
def test_provider_params_the_adapter_does_not_set_are_not_refused_as_overrides(
    offline: dict[str, Provider], provider: str
) -> None:
    request = ImageRequest.model_validate(
        {"prompt": "p", "provider_params": {"user": "team-a", "style": "vivid"}}
    )
    problems = offline[provider].validate(request)
    assert not [reason for _, reason in problems if RULE in reason]
    if provider in BUILT_HERE:  # Oxen checks its parameters against its own schema as well
        assert problems == []


def test_a_line_that_would_buy_more_images_than_priced_is_rejected_by_plan(
    offline: dict[str, Provider],
) -> None:
    line = json.dumps(
        {"prompt": "a mug", "n": 1, "quality": "low", "provider_params": {"number_of_images": 10}}
    ).encode()
    field, reason = rejection_of(line, offline["apiframe"].validate)
    assert field == "provider_params"
    assert reason == (
        "provider_params.number_of_images: set it with the manifest's own field 'n' instead " + RULE
    )


@pytest.mark.parametrize("provider", BUILT_HERE)
def test_the_body_sent_never_asks_for_more_images_than_were_priced(
    offline: dict[str, Provider], provider: str
) -> None:
    # Even a request that skipped validation buys what the estimate priced.
    key = "number_of_images" if provider == "apiframe" else "n"
    request = ImageRequest.model_validate(
        {"prompt": "p", "n": 1, "quality": "low", "provider_params": {key: 10, "size": "9x9"}}
    )
    body: dict[str, Any] = offline[provider].body(request)  # type: ignore[attr-defined]
    sent = body.get("gptImageParams", body)
    assert sent.get(key, 1) == 1
    if provider != "apiframe":
        assert sent.get("size") is None


# -- numbers Python's json reads but no JSON writer can write back --------------------------------


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"prompt": "p", "metadata": {"w": NaN}}', "not valid JSON: NaN is not a JSON number"),
        (
            b'{"prompt": "p", "metadata": {"w": -Infinity}}',
            "not valid JSON: -Infinity is not a JSON number",
        ),
        (
            b'{"prompt": "p", "metadata": {"w": 1e999}}',
            "not valid JSON: number 1e999 is out of range",
        ),
        (
            b'{"prompt": "p", "metadata": {"w": ' + b"9" * 5000 + b"}}",
            "not valid JSON: a number has more than 4300 digits",
        ),
    ],
    ids=["nan", "infinity", "overflow", "5000-digits"],
)
def test_a_number_json_cannot_carry_is_rejected_alone(line: bytes, reason: str) -> None:
    assert rejection_of(line) == (None, reason)
