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

AdapterFor = Callable[[str], Provider]


class Checker:
    """Validates each line against its own provider (or the batch default)."""

    def __init__(self, adapter_for: AdapterFor, default_provider: str) -> None:
        self.adapter_for = adapter_for
        self.default = default_provider

    def provider_of(self, request: ImageRequest) -> str:
        return request.provider or self.default

    def __call__(self, request: ImageRequest) -> list[tuple[str, str]]:
        name = self.provider_of(request)
        try:
            adapter = self.adapter_for(name)
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
        name = check.provider_of(line.request)
        adapter = adapter_for(name)
        part = self.by_provider.setdefault(name, ProviderTotal(unit=adapter.credit_unit))
        part.lines += 1
        part.images += line.request.n
        part.credits = round(part.credits + adapter.estimate(line.request), 6)
        if not adapter.price_known(line.request):
            model = line.request.model
            self.unpriced[model] = self.unpriced.get(model, 0) + 1
        self.valid += 1
        self.images += line.request.n

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
) -> Plan:
    """Validate and price the whole manifest without touching Redis or any provider;
    ``check_with`` (when given) makes the adapters lines are validated with (raising the
    ``ConfigError`` of a provider a run could not reach)."""
    check = Checker(check_with or adapter_for, default_provider)
    plan = Plan()
    for _, line in counted_lines(chunks, check):
        plan.add(line, adapter_for, check)
        if on_line is not None:
            on_line(line)
    return plan
