"""Service tiers: the same model at another price for an answer that may come later.

`Tier.STANDARD` is the usual synchronous call; `FLEX` a synchronous call on a slower,
cheaper service tier (OpenAI's flex); `BATCH` a request sent in a provider batch (OpenAI
Batch API, Anthropic Message Batches, Gemini batch mode), answered within hours at about
half the price; `OFF_PEAK` a standard call made in a cheaper time-of-day window
(DeepSeek's). A node whose needs set a `deadline` may be routed to any tier that can answer
before it; the run parks (status `waiting`) on the tiers that answer later.

Which provider offers which tier, and on what terms (turnaround, completion window, batch
limits, a fallback discount, each with its source) is in `data/tiers.toml`; a catalog entry
overrides it with its `tiers` table (`TierOverride`). `tier_terms(spec, tier)` gives the
terms (None: not offered), `tier_prices(spec, tier, at)` the per-token prices ranking uses,
`off_peak_windows` / `next_off_peak` the cheaper hours; `ModelSpec.cost(usage, tier, at)`
prices a call.
"""

from __future__ import annotations

import functools
import tomllib
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from enum import StrEnum
from importlib import resources
from typing import TYPE_CHECKING, Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo

    from .catalog import ModelSpec

__all__ = [
    "DEADLINE_MARGIN",
    "Margin",
    "Tier",
    "TierOverride",
    "TierTerms",
    "check_tier_overrides",
    "next_off_peak",
    "off_peak_windows",
    "price_ref",
    "standard_call_s",
    "tier_prices",
    "tier_terms",
]


class Tier(StrEnum):
    """How a call is served, and at which price (`ff_attempts.tier`)."""

    STANDARD = "standard"
    FLEX = "flex"
    BATCH = "batch"
    OFF_PEAK = "off_peak"

    @property
    def parks(self) -> bool:
        """Whether a call on this tier parks its run until its answer (or hour) comes."""
        return self is Tier.BATCH or self is Tier.OFF_PEAK

    @property
    def price_context(self) -> dict[str, str] | None:
        """The genai-prices `price_context` that selects this tier's price variant."""
        return _CONTEXTS.get(self)


_CONTEXTS = {Tier.BATCH: {"processing": "batch"}, Tier.FLEX: {"service_tier": "flex"}}
_OTHER_TIERS = tuple(t.value for t in Tier if t is not Tier.STANDARD)


class TierOverride(BaseModel):
    """A catalog entry's own terms for one tier (`tiers = { batch = {...} }` in its entry).

    `enabled = false` withdraws a tier its provider offers; an entry may also enable a tier
    its provider does not list (the tier's generic terms then apply). Prices: `input_price`
    and `output_price` (USD per million tokens on this tier), else `discount` (a share of the
    standard price), else genai-prices' variant, else the provider's discount."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = True
    discount: float | None = Field(default=None, gt=0, le=1)
    input_price: float | None = Field(default=None, ge=0)
    output_price: float | None = Field(default=None, ge=0)
    turnaround_p50_s: float | None = Field(default=None, ge=0)
    turnaround_p90_s: float | None = Field(default=None, ge=0)
    latency_s: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _both_prices(self) -> Self:
        if (self.input_price is None) != (self.output_price is None):
            raise ValueError("set both input_price and output_price (USD per million tokens "
                             "on this tier), or neither")
        return self


def check_tier_overrides(value: dict[str, TierOverride]) -> dict[str, TierOverride]:
    """ModelSpec's `tiers` validator: only known tiers (standard is the entry itself)."""
    for name in value:
        if name not in _OTHER_TIERS:
            raise ValueError(f"unknown tier {name!r}; known: {', '.join(_OTHER_TIERS)}")
    return value


@dataclass(frozen=True, slots=True)
class TierTerms:
    """What one model's tier promises: what ranking and the batch poller need."""

    tier: Tier
    provider: str
    turnaround_p50_s: float
    """Prior median time from request to answer (batch: submission to results)."""
    turnaround_p90_s: float
    """Prior 90th percentile of it: what a deadline is checked against."""
    window_s: float | None = None
    """The provider's completion window (a batch not done by then expires)."""
    max_items: int | None = None
    """Requests per provider batch."""
    max_bytes: int | None = None
    """Bytes per provider batch (its input file, or its inline requests)."""
    latency_s: float | None = None
    """Flex: the prior worst latency of one synchronous call (the client timeout to use)."""
    miss_rate: float = 0.0
    """Prior share of requests not answered in time (then made again at standard price)."""
    discount: float | None = None
    """The tier's price as a share of the standard price, for models genai-prices has no
    variant for (None: only such models are offered the tier)."""
    source: str = ""
    """Public page stating the terms."""
    turnaround_source: str = ""
    pricing_source: str = ""
    note: str = ""


@dataclass(frozen=True, slots=True)
class Margin:
    """How much earlier than its deadline a slower tier must be expected to answer:
    max(`min_s`, `share` x the time left), so that a late answer can still be replaced by a
    synchronous call (whose own time `standard_call_s` is added by ranking)."""

    min_s: float = 600.0
    share: float = 0.1

    def __call__(self, left_s: float) -> float:
        return max(self.min_s, self.share * left_s)


def _data() -> dict[str, Any]:
    return _load()


@functools.cache
def _load() -> dict[str, Any]:
    text = (resources.files("frugalflow") / "data" / "tiers.toml").read_text()
    data: dict[str, Any] = tomllib.loads(text)
    return data


DEADLINE_MARGIN = Margin(float(_data()["margin"]["min_s"]), float(_data()["margin"]["share"]))
"""The default margin (data/tiers.toml [margin]): max(10 min, 10% of the time left)."""

_TOKENS_PER_S = float(_data()["margin"]["output_tokens_per_s"])


def standard_call_s(spec: ModelSpec, output_tokens: float) -> float:
    """Rough seconds a standard call of `spec` takes: its latency plus `output_tokens` at
    the prior output speed (tiers.toml [margin] output_tokens_per_s)."""
    return spec.latency_ms / 1000 + output_tokens / _TOKENS_PER_S


# -- terms -----------------------------------------------------------------------------


def _terms_fields(provider: str, tier: Tier, listed_only: bool) -> dict[str, Any] | None:
    data = _data()
    own = data.get("providers", {}).get(provider, {}).get(tier.value)
    if own is None and listed_only:
        return None
    return {**data.get("defaults", {}).get(tier.value, {}), **(own or {})}


def tier_terms(spec: ModelSpec, tier: Tier | str) -> TierTerms | None:
    """`spec`'s terms on `tier`, or None when it is not offered there (its provider does not
    list it and its entry does not enable it, its entry disables it, no price exists for
    it, or, for off_peak, genai-prices knows no cheaper hours of the model)."""
    tier = Tier(tier)
    memo = spec._tier_memo
    key = ("terms", tier)
    if key in memo:
        hit: TierTerms | None = memo[key]
        return hit
    memo[key] = terms = _tier_terms(spec, tier)
    return terms


def _tier_terms(spec: ModelSpec, tier: Tier) -> TierTerms | None:
    if tier is Tier.STANDARD:
        s = spec.latency_ms / 1000
        return TierTerms(tier, spec.provider, s, s, source="catalog latency_ms")
    override = spec.tiers.get(tier.value)
    if override is not None and not override.enabled:
        return None
    fields = _terms_fields(spec.provider, tier, listed_only=override is None)
    if fields is None:
        return None
    names = set(TierTerms.__dataclass_fields__) - {"tier", "provider"}
    terms = TierTerms(tier, spec.provider, **{k: v for k, v in fields.items() if k in names})
    if override is not None:
        changes = {k: v for k in ("turnaround_p50_s", "turnaround_p90_s", "latency_s", "discount")
                   if (v := getattr(override, k)) is not None}
        if changes:
            terms = replace(terms, **changes)
    if tier is Tier.OFF_PEAK:
        return terms if off_peak_windows(spec) else None
    own_price = override is not None and override.input_price is not None
    if own_price or terms.discount is not None or has_variant(spec, tier):
        return terms
    return None


# -- genai-prices ----------------------------------------------------------------------


def model_info(spec: ModelSpec) -> ModelInfo | None:
    """genai-prices' record of `spec` (None: unknown, or the entry sets its own prices).
    Only a model listed under its own provider: genai-prices ignores price variants of a
    model it finds through another provider."""
    memo = spec._tier_memo
    if "info" in memo:
        hit: ModelInfo | None = memo["info"]
        return hit
    memo["info"] = info = _model_info(spec)
    return info


def _model_info(spec: ModelSpec) -> ModelInfo | None:
    if spec.input_price is not None and spec.output_price is not None:
        return None
    from genai_prices import data_snapshot

    provider_id, model = price_ref(spec)
    try:
        provider, info = data_snapshot.get_snapshot().find_provider_model(
            model, None, provider_id, None)
    except Exception:  # genai-prices raises LookupError or plain errors for unknown models
        return None
    return info if any(info is m for m in provider.models) else None


def price_ref(spec: ModelSpec) -> tuple[str | None, str]:
    """(provider, model) under which genai-prices knows `spec` (its `price_ref`, else its
    own provider and model)."""
    if spec.price_ref:
        provider, _, model = spec.price_ref.partition(":")
        return (provider or None, model) if model else (None, provider)
    return spec.provider, spec.model


def has_variant(spec: ModelSpec, tier: Tier, at: datetime | None = None) -> bool:
    """Whether genai-prices prices `spec` on `tier` (a price variant for its context)."""
    context = tier.price_context
    info = model_info(spec)
    if context is None or info is None:
        return False
    when = _utc(at) if at is not None else datetime.now(UTC)
    return any(
        all(context.get(k) == v for k, v in variant.when.items())
        and (variant.constraint is None or variant.constraint.active(when))
        for variant in info.price_variants or ()
    )


def _utc(at: datetime) -> datetime:
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


_DAY = 86_400


def _seconds(t: time) -> int:
    """A time of day as UTC seconds since midnight (naive: UTC, as genai-prices reads it)."""
    if t.tzinfo is not None:
        t = datetime.combine(date(1970, 1, 2), t).astimezone(UTC).time()
    return t.hour * 3600 + t.minute * 60 + t.second


def _bounds(spec: ModelSpec) -> tuple[tuple[int, ...], bool]:
    """The UTC seconds of day where `spec`'s genai-prices price may change, and whether a
    dated price (StartDateConstraint) is among its prices."""
    memo = spec._tier_memo
    if "bounds" in memo:
        hit: tuple[tuple[int, ...], bool] = memo["bounds"]
        return hit
    from genai_prices.types import StartDateConstraint, TimeOfDateConstraint

    info = model_info(spec)
    points: set[int] = set()
    dated = False
    for conditional in info.prices if info is not None and isinstance(info.prices, list) else ():
        c = conditional.constraint
        if isinstance(c, TimeOfDateConstraint):
            points.update((_seconds(c.start_time), _seconds(c.end_time)))
        elif isinstance(c, StartDateConstraint):
            dated = True
    memo["bounds"] = out = (tuple(sorted(points)), dated)
    return out


def _price_at(info: ModelInfo, at: datetime) -> Decimal:
    from genai_prices.types import Usage as GUsage

    price = info.get_prices(at).calc_price(GUsage(input_tokens=10_000, output_tokens=10_000))
    return price["total_price"]


def off_peak_windows(spec: ModelSpec, on: date | None = None) -> list[tuple[time, time]]:
    """`spec`'s cheaper hours on day `on` (default today, UTC) as (start, end) UTC times,
    from genai-prices' time-of-day prices: every stretch of the day priced below its dearest
    hours (an end before its start runs past midnight). [] when its price does not vary by
    the hour, its entry sets its own prices, or its entry disables off_peak."""
    override = spec.tiers.get(Tier.OFF_PEAK.value)
    if override is not None and not override.enabled:
        return []
    day = on or datetime.now(UTC).date()
    memo = spec._tier_memo
    key = ("windows", day)
    if key in memo:
        hit: list[tuple[time, time]] = memo[key]
        return list(hit)
    memo[key] = windows = _windows(spec, day)
    return list(windows)


def _windows(spec: ModelSpec, day: date) -> list[tuple[time, time]]:
    points, _ = _bounds(spec)
    info = model_info(spec)
    if info is None or len(points) < 2:
        return []
    n = len(points)
    spans = [(points[i], points[(i + 1) % n]) for i in range(n)]  # the last one wraps
    midnight = datetime.combine(day, time(), tzinfo=UTC)
    prices = [_price_at(info, midnight + timedelta(seconds=(s + ((e - s) % _DAY) / 2) % _DAY))
              for s, e in spans]
    peak = max(prices)
    cheap = [p < peak for p in prices]
    if all(cheap) or not any(cheap):
        return []
    first = cheap.index(False) + 1  # start just after a peak span: merged runs never wrap
    windows: list[tuple[int, int]] = []
    for k in range(n):
        i = (first + k) % n
        if not cheap[i]:
            continue
        s, e = spans[i]
        if windows and cheap[(i - 1) % n] and k > 0:
            windows[-1] = (windows[-1][0], e)
        else:
            windows.append((s, e))
    return [(_time(s), _time(e)) for s, e in sorted(windows)]


def _time(seconds: int) -> time:
    return time(seconds // 3600, seconds % 3600 // 60, seconds % 60, tzinfo=UTC)


def next_off_peak(spec: ModelSpec, now: datetime | None = None) -> tuple[datetime, datetime] | None:
    """The cheaper window in progress at `now` (then its start is `now`) or the next one to
    open, as UTC (start, end); None when `spec` is not offered the off_peak tier."""
    if tier_terms(spec, Tier.OFF_PEAK) is None:
        return None
    now = _utc(now) if now is not None else datetime.now(UTC)
    best: tuple[datetime, datetime] | None = None
    for offset in (-1, 0, 1, 2):
        day = now.date() + timedelta(days=offset)
        for s, e in off_peak_windows(spec, day):
            start = datetime.combine(day, s).astimezone(UTC)
            end = datetime.combine(day if e > s else day + timedelta(days=1), e).astimezone(UTC)
            if end <= now:
                continue
            found = (max(start, now), end)
            if best is None or found[0] < best[0]:
                best = found
    return best


# -- prices ----------------------------------------------------------------------------


def _window_key(spec: ModelSpec, at: datetime | None) -> tuple[int, date | None] | None:
    """Which stretch of the day `at` falls in, for `spec`'s prices (None: they do not vary
    with the time, or `at` is None)."""
    if at is None:
        return None
    points, dated = _bounds(spec)
    if not points and not dated:
        return None
    at = _utc(at)
    second = at.hour * 3600 + at.minute * 60 + at.second
    return sum(1 for p in points if p <= second), at.date()


def tier_prices(spec: ModelSpec, tier: Tier | str = Tier.STANDARD,
                at: datetime | None = None) -> tuple[float, float]:
    """USD per input token and per output token of `spec` on `tier` at time `at` (None:
    now; off_peak: its next window), as ranking uses them (the price of a 10k-token call,
    like `ModelSpec.input_price_per_mtok`). Cached per (spec, tier, stretch of the day)."""
    tier = Tier(tier)
    key = ("prices", tier, _window_key(spec, at))
    if key[2] is None and tier is Tier.STANDARD:
        return spec.input_price_per_mtok / 1e6, spec.output_price_per_mtok / 1e6
    memo = spec._tier_memo
    hit: tuple[float, float] | None = memo.get(key)
    if hit is None:
        from .usage import Usage

        hit = memo[key] = (spec.cost(Usage(input_tokens=10_000), tier, at) / 10_000,
                           spec.cost(Usage(output_tokens=10_000), tier, at) / 10_000)
    return hit
