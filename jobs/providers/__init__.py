"""Provider adapters by name, built from the registry (``jobs.registry``)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jobs.errors import ConfigError
from jobs.registry import REGISTRY, ProviderSpec, names
from jobs.settings import ProviderConfig

if TYPE_CHECKING:
    from jobs.providers.base import Provider
    from jobs.settings import CoreSettings

__all__ = ["adapter_class", "build", "build_adapter", "create", "names"]


def adapter_class(spec: ProviderSpec) -> type[Provider]:
    """The adapter class a spec names (``module:Class``), imported on first use."""
    module, _, name = spec.adapter.partition(":")
    cls: type[Provider] = getattr(importlib.import_module(module), name)
    return cls


def build_adapter(spec: ProviderSpec, config: ProviderConfig) -> Provider:
    return adapter_class(spec)(config)  # type: ignore[call-arg]


def _known(name: str) -> None:
    if name not in REGISTRY:
        raise ConfigError(f"unknown provider {name!r}: use one of {', '.join(names())}")


def build(name: str, settings: CoreSettings) -> Provider:
    """An adapter for validating and pricing; it may lack the key it needs to submit."""
    _known(name)
    return build_adapter(REGISTRY[name], settings.provider_config(name))


def create(name: str, settings: CoreSettings) -> Provider:
    """A ready adapter, or ``ConfigError`` naming the setting that is missing."""
    _known(name)
    spec = REGISTRY[name]
    config = settings.provider_config(name)
    setting = f"IMAGEBATCH_{spec.field.upper()}"
    if spec.same_account_as is not None:
        setting = f"IMAGEBATCH_{REGISTRY[spec.same_account_as].field.upper()}"
    if not config.base_url:
        raise ConfigError(
            f"provider {name!r} has no base URL: set {setting}_BASE_URL"
            + (
                " to a running `imagebatch simulate` (imagebatch run starts one by itself)"
                if spec.builtin_simulator
                else ""
            )
        )
    if config.api_key is None:
        raise ConfigError(
            f"no provider key: set {setting}_API_KEY, or use --provider simulator to try it out"
        )
    return build_adapter(spec, config)
