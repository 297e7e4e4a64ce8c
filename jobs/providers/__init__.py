"""Provider adapters by name. A new provider is one module here plus one line in ``ADAPTERS``."""

from __future__ import annotations

from collections.abc import Callable

from jobs.errors import ConfigError
from jobs.providers.aimlapi import AIMLAPI
from jobs.providers.apiframe import APIFrame
from jobs.providers.base import Provider
from jobs.providers.omixa import Omixa
from jobs.providers.openai import OpenAI
from jobs.providers.oxen import Oxen
from jobs.settings import ProviderConfig, Settings

ADAPTERS: dict[str, Callable[[ProviderConfig], Provider]] = {
    "apiframe": APIFrame,
    "simulator": APIFrame,
    "openai": OpenAI,
    "aimlapi": AIMLAPI,
    "omixa": Omixa,
    "oxen": Oxen,
}
DESCRIPTIONS = {
    "apiframe": "APIFrame API",
    "simulator": "APIFrame API",
    "openai": "OpenAI Images API",
    "aimlapi": "AI/ML API",
    "omixa": "Omixa gateway",
    "oxen": "Oxen.ai",
}


def names() -> list[str]:
    return list(ADAPTERS)


def build(name: str, settings: Settings) -> Provider:
    """An adapter for validating and pricing; it may lack the key it needs to submit."""
    if name not in ADAPTERS:
        raise ConfigError(f"unknown provider {name!r}: use one of {', '.join(ADAPTERS)}")
    return ADAPTERS[name](settings.provider_config(name))


def create(name: str, settings: Settings) -> Provider:
    """A ready adapter, or ``ConfigError`` naming the setting that is missing."""
    if name not in ADAPTERS:
        raise ConfigError(f"unknown provider {name!r}: use one of {', '.join(ADAPTERS)}")
    config = settings.provider_config(name)
    if name == "simulator" and not config.base_url:
        raise ConfigError(
            "provider 'simulator' needs a running simulator: start `imagebatch simulate` "
            "and set IMAGEBATCH_SIMULATOR_BASE_URL (imagebatch run starts one by itself)"
        )
    if config.api_key is None:
        raise ConfigError(
            f"no provider key: set IMAGEBATCH_{name.upper()}_API_KEY, "
            "or use --provider simulator to try it out"
        )
    return ADAPTERS[name](config)
