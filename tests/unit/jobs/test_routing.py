"""A pool's candidates for a line: who can take it, cheapest first in USD, unknown prices last."""

from __future__ import annotations

from typing import Any

import pytest

from jobs import providers
from jobs.errors import ConfigError
from jobs.manifest.request import ImageRequest
from jobs.providers.base import Provider
from jobs.routing import AUTO, choose, members, refusal
from jobs.settings import Settings

KEYED = ("apiframe", "openai", "aimlapi", "omixa", "oxen")


def settings(**values: Any) -> Settings:
    keys = {
        "apiframe_api_key": "afk_x",
        "openai_api_key": "sk-x",
        "aimlapi_api_key": "k",
        "omixa_api_key": "k",
        "oxen_api_key": "k",
    }
    built: Settings = Settings(_env_file=None, **(keys | values))  # type: ignore[call-arg]
    return built


def adapters(configured: Settings) -> Any:
    made: dict[str, Provider] = {}

    def adapter_for(name: str) -> Provider:
        if name not in made:
            made[name] = providers.create(name, configured)
        return made[name]

    return adapter_for


def test_auto_is_every_provider_with_a_key_but_the_simulator_and_batch_apis() -> None:
    assert members(AUTO, (*KEYED, "simulator", "openai-batch")) == KEYED


def test_a_list_keeps_the_user_s_order_and_names_one_provider_each_once() -> None:
    assert members("oxen, openai,oxen", KEYED) == ("oxen", "openai")
    assert members("openai", KEYED) is None  # one name: pinned, not a pool


def test_an_unknown_member_or_an_empty_auto_is_refused_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match="unknown provider opnai in --provider"):
        members("openai,opnai", KEYED)
    with pytest.raises(ConfigError, match="IMAGEBATCH_<NAME>_API_KEY"):
        members(AUTO, ())
    with pytest.raises(ConfigError, match="openai-batch sends lines in groups"):
        members("openai,openai-batch", KEYED)


def test_candidates_are_ranked_cheapest_first_in_usd() -> None:
    configured = settings(usd_per_credit_apiframe=0.001, usd_per_credit_aimlapi=0.0001)
    line = ImageRequest(prompt="a chair", quality="medium", size="1024x1024")

    choice = choose(KEYED, line, adapters(configured), configured.usd_rates())

    # medium 1024x1024: APIFrame 9 credits (0.009), OpenAI 0.034, AI/ML API 88.4 credits
    # (0.00884), Omixa 0.039, Oxen 0.042
    assert choice.candidates == ("aimlapi", "apiframe", "openai", "omixa", "oxen")
    assert choice.refused == {}


def test_a_provider_of_unknown_usd_price_ranks_after_every_known_one() -> None:
    configured = settings()  # no USD price for APIFrame's or AI/ML API's credits
    line = ImageRequest(prompt="a chair", quality="medium", size="1024x1024")

    choice = choose(("apiframe", "oxen", "aimlapi", "openai"), line, adapters(configured), {})

    assert choice.candidates == ("openai", "oxen", "apiframe", "aimlapi")


def test_a_provider_that_cannot_take_the_line_s_fields_is_no_candidate() -> None:
    configured = settings()
    line = ImageRequest(prompt="a chair", moderation="low")  # Oxen and APIFrame 1.5: no setting

    choice = choose(("oxen", "openai", "apiframe"), line, adapters(configured), {})

    assert choice.candidates == ("openai",)
    assert set(choice.refused) == {"oxen", "apiframe"}


def test_a_price_ceiling_keeps_dearer_and_unknown_providers_off_the_line() -> None:
    configured = settings(usd_per_credit_apiframe=0.001)
    line = ImageRequest(prompt="a chair", quality="medium", size="1024x1024")

    choice = choose(
        ("omixa", "apiframe", "aimlapi"),
        line,
        adapters(configured),
        {"apiframe": 0.001},
        max_usd_per_image=0.02,
    )

    assert choice.candidates == ("apiframe",)
    assert "over --max-usd-per-image" in choice.refused["omixa"]
    assert "unknown" in choice.refused["aimlapi"]


def test_a_line_no_member_can_take_is_refused_with_each_member_s_reason() -> None:
    configured = settings(openai_api_key=None)
    line = ImageRequest(prompt="a chair", moderation="low")

    choice = choose(("oxen", "openai"), line, adapters(configured), {})

    assert choice.candidates == ()
    reason = refusal(choice)
    assert reason.startswith("no provider of the pool can take this line: oxen: ")
    assert "openai: no provider key: set IMAGEBATCH_OPENAI_API_KEY" in reason
