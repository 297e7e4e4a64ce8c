"""The line checker: each line against its own provider (or the batch default), a pool's line
against every member, and the provider or candidates the line goes to.

One ``Checker`` serves a whole manifest: ``validate.tally`` and ``start`` hand it to the
parser (``jobs.manifest.parse``), which calls it for every line that parsed; the feeder asks
it for the provider and pool of each line it admits.
"""

from __future__ import annotations

from collections.abc import Callable

from jobs.errors import ConfigError
from jobs.manifest.request import ImageRequest
from jobs.providers.base import Provider
from jobs.routing import POOLED, Choice, PoolRules, choose, is_pool, members, refusal

AdapterFor = Callable[[str], Provider]


class Checker:
    """Validates each line against its own provider (or the batch default); a line of a pool
    (``auto``, ``a,b,c``) against every member, keeping those that can take it."""

    def __init__(
        self, adapter_for: AdapterFor, default_provider: str, rules: PoolRules | None = None
    ) -> None:
        self.adapter_for = adapter_for
        self.default = default_provider
        self.rules = rules or PoolRules()
        self._pools: dict[str, tuple[str, ...] | None] = {}
        self._last: tuple[ImageRequest, Choice | None] | None = None

    def route(self, request: ImageRequest) -> Choice | None:
        """The line's candidates, cheapest first; None for a line pinned to one provider.

        Raises:
            ConfigError: the pool names an unknown provider, or ``auto`` finds no key.
        """
        if self._last is not None and self._last[0] is request:
            return self._last[1]
        spec = request.provider or self.default
        if spec not in self._pools:
            self._pools[spec] = members(spec, self.rules.keyed) if is_pool(spec) else None
        pool = self._pools[spec]
        rules = self.rules
        choice = (
            None
            if pool is None
            else choose(pool, request, self.adapter_for, rules.usd_rates, rules.max_usd_per_image)
        )
        self._last = (request, choice)
        return choice

    def provider_of(self, request: ImageRequest) -> str:
        """The provider the line goes to first (a pool's cheapest candidate)."""
        choice = self.route(request)
        if choice is None:
            return request.provider or self.default
        return choice.candidates[0]

    def bought_as(self, request: ImageRequest) -> str:
        """The provider a line's fingerprint names (``routing.POOLED`` for a pool line)."""
        return POOLED if self.route(request) is not None else self.provider_of(request)

    def pool_of(self, request: ImageRequest) -> tuple[str, ...]:
        """A pool line's candidates, cheapest first; empty for a pinned line."""
        choice = self.route(request)
        return () if choice is None else choice.candidates

    def __call__(self, request: ImageRequest) -> list[tuple[str, str]]:
        try:
            choice = self.route(request)
        except ConfigError as exc:
            return [("provider", exc.message)]
        if choice is not None:
            return [] if choice.candidates else [("provider", refusal(choice))]
        try:
            adapter = self.adapter_for(request.provider or self.default)
        except ConfigError as exc:
            return [("provider", exc.message)]
        return adapter.validate(request)
