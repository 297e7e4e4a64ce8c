"""Validating a whole manifest before anything is spent: each line against its own provider,
counted and priced per provider (money of different units is never added together)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from jobs.checker import AdapterFor, Checker
from jobs.errors import ManifestError
from jobs.manifest import parse
from jobs.manifest.parse import Line
from jobs.manifest.request import ImageRequest
from jobs.pricing import Money, ProviderTotal, money_of
from jobs.routing import PoolRules, usd_per_image


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
