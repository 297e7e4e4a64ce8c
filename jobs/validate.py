"""Validating a whole manifest before anything is spent: each line against its own provider,
counted and priced per provider (money of different units is never added together)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from jobs.errors import ConfigError, ManifestError
from jobs.manifest import parse
from jobs.manifest.parse import Line
from jobs.manifest.request import ImageRequest
from jobs.pricing import Money, ProviderTotal, money_of
from jobs.providers.base import Provider
from jobs.routing import (
    POOLED,
    Choice,
    PoolRules,
    choose,
    is_pool,
    members,
    refusal,
    usd_per_image,
)

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


@dataclass
class Plan:
    """What validating a manifest found, before anything is spent."""

    lines: int = 0
    valid: int = 0
    images: int = 0
    rejected: int = 0
    by_provider: dict[str, ProviderTotal] = field(default_factory=dict)
    """Per provider; ``credits`` is the estimate."""
    first_rejections: list[ManifestError] = field(default_factory=list)
    reused: int = 0
    """Valid lines already bought under the output: counted, not priced (``take_out``)."""
    pooled: int = 0
    """Valid lines of a pool: priced at their cheapest member (``by_provider``)."""
    members: set[str] = field(default_factory=set)
    """Every provider a pool line may go to."""
    pool_worst_usd: float | None = 0.0
    """What the pool lines would cost, in USD, if each went to its dearest member (a cheaper
    one being full); None when some member's USD price is unknown."""

    @property
    def providers(self) -> set[str]:
        """Every provider the batch may buy from."""
        return set(self.by_provider) | self.members

    unpriced: dict[str, int] = field(default_factory=dict)
    """Lines by model whose price is not published: not in the estimate (``plan`` says so)."""

    @property
    def estimate(self) -> Money:
        return money_of(self.by_provider)

    def add(self, line: Line, adapter_for: AdapterFor, check: Checker) -> None:
        self.lines += 1
        if line.request is None:
            self.rejected += 1
            if line.rejection is not None and len(self.first_rejections) < 100:
                self.first_rejections.append(line.rejection)
            return
        request = line.request
        name = check.provider_of(request)
        adapter = adapter_for(name)
        part = self.by_provider.setdefault(name, ProviderTotal(unit=adapter.credit_unit))
        part.lines += 1
        part.images += request.n
        part.credits = round(part.credits + adapter.estimate(request), 6)
        if not adapter.price_known(request):
            self.unpriced[request.model] = self.unpriced.get(request.model, 0) + 1
        self.valid += 1
        self.images += request.n
        pool = check.pool_of(request)
        if pool:
            self.pooled += 1
            self.members.update(pool)
            rates = check.rules.usd_rates
            prices = [usd_per_image(adapter_for(p), request, rates.get(p)) for p in pool]
            worst = None if None in prices else max(p or 0.0 for p in prices) * request.n
            self.pool_worst_usd = (
                None
                if worst is None or self.pool_worst_usd is None
                else round(self.pool_worst_usd + worst, 6)
            )

    def take_out(self, request: ImageRequest, adapter_for: AdapterFor, check: Checker) -> None:
        """A valid line that will be taken from an earlier batch: it costs nothing."""
        name = check.provider_of(request)
        part = self.by_provider[name]
        part.lines -= 1
        part.images -= request.n
        part.credits = round(part.credits - adapter_for(name).estimate(request), 6)
        if request.model in self.unpriced and not adapter_for(name).price_known(request):
            self.unpriced[request.model] -= 1
            if not self.unpriced[request.model]:
                del self.unpriced[request.model]
        if part.lines <= 0:
            del self.by_provider[name]
        self.reused += 1


def counted_lines(chunks: Iterable[bytes], check: Checker) -> Iterator[tuple[int, Line]]:
    """Every counted line with its index (0-based among counted lines)."""
    yield from enumerate(parse.read_manifest(chunks, check))


def tally(
    chunks: Iterable[bytes],
    adapter_for: AdapterFor,
    default_provider: str,
    on_line: Callable[[Line], None] | None = None,
    check_with: AdapterFor | None = None,
    rules: PoolRules | None = None,
) -> Plan:
    """Validate and price the whole manifest without touching Redis or any provider;
    ``check_with`` (when given) makes the adapters lines are validated with (raising the
    ``ConfigError`` of a provider a run could not reach)."""
    check = Checker(check_with or adapter_for, default_provider, rules)
    plan = Plan()
    for _, line in counted_lines(chunks, check):
        plan.add(line, adapter_for, check)
        if on_line is not None:
            on_line(line)
    return plan
