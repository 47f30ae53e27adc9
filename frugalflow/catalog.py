"""The model catalog: what each model costs, what it can do, how good it is, how to build it.

Prices come from `genai-prices` and capabilities from the LangChain integration's model
profile (`ChatModel.profile`); a catalog entry may override any field. Only models whose
provider is configured (its API key is set, or it is local) are *available*.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .exceptions import CatalogError
from .needs import SKILLS
from .tiers import Tier, TierOverride, check_tier_overrides, has_variant, next_off_peak
from .tiers import price_ref as _price_ref
from .tiers import tier_terms
from .usage import Usage

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from .needs import Needs
    from .providers.base import ProviderAdapter
    from .ranking import Prefilter

__all__ = ["CAPABILITIES", "SKILLS", "Capabilities", "Catalog", "ModelSpec"]

log = logging.getLogger("frugalflow")

CAPABILITIES: tuple[str, ...] = (
    "tool_calling",
    "structured_output",
    "vision",
    "streaming",
    "reasoning",
)
_DEFAULT_CONTEXT = 8_192
_DEFAULT_MAX_OUTPUT = 4_096


class Capabilities(BaseModel):
    """What a model can do: the hard needs of a node are checked against these."""

    model_config = ConfigDict(frozen=True)

    tool_calling: bool = False
    structured_output: bool = False
    vision: bool = False
    streaming: bool = True
    reasoning: bool = False


@dataclass(frozen=True)
class _Resolved:
    input_price: float  # USD per million tokens
    output_price: float
    cached_input_price: float | None
    context_window: int
    max_output_tokens: int
    capabilities: Capabilities
    priced: bool
    linear: bool = False  # genai-prices has no tiers for it: unit prices give the exact cost
    sources: dict[str, str] = field(default_factory=dict)


class ModelSpec(BaseModel):
    """One model at one provider.

    Fields left unset are filled from `genai-prices` (prices) and the integration's model
    profile (context window, max output, capabilities). Never put a key here: name the
    environment variable that holds it (`api_key_env`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: str
    model: str
    integration: str | None = None
    """`module:Class` of the LangChain chat model; default: the provider adapter's."""
    base_url: str | None = None
    api_key_env: str | None = None
    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    price_ref: str | None = None
    """`provider:model` under which genai-prices knows this model; default provider:model."""
    input_price: float | None = Field(default=None, ge=0)
    """USD per million input tokens (overrides genai-prices)."""
    output_price: float | None = Field(default=None, ge=0)
    cached_input_price: float | None = Field(default=None, ge=0)
    context_window: int | None = Field(default=None, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    capabilities: dict[str, bool] = Field(default_factory=dict)
    profile_from: str | None = None
    """`module:Class` whose model profile describes this model (e.g. langchain_groq:ChatGroq)."""
    quality: dict[str, float] = Field(default_factory=dict)
    quality_sources: dict[str, str] = Field(default_factory=dict)
    quality_ref: str | None = None
    """Key of this model's scores in the catalog's quality table (same weights, other host)."""
    rpm: int | None = Field(default=None, gt=0)
    """Requests per minute this account may send to this model (None: no limit enforced)."""
    tpm: int | None = Field(default=None, gt=0)
    """Tokens (input + expected output) per minute, likewise."""
    latency_ms: float = Field(default=1000.0, ge=0)
    """Typical latency of a short call, used to break ties and for `max_latency_ms`."""
    local: bool = False
    simulated: bool = False
    description: str = ""
    tiers: dict[str, TierOverride] = Field(default_factory=dict)
    """This entry's own terms per service tier (batch, flex, off_peak), over its provider's
    in data/tiers.toml: e.g. `{ batch = { discount = 0.4 }, flex = { enabled = false } }`."""

    @field_validator("tiers")
    @classmethod
    def _known_tiers(cls, value: dict[str, TierOverride]) -> dict[str, TierOverride]:
        return check_tier_overrides(value)

    @field_validator("capabilities")
    @classmethod
    def _known_capabilities(cls, value: dict[str, bool]) -> dict[str, bool]:
        unknown = set(value) - set(CAPABILITIES)
        if unknown:
            raise ValueError(
                f"unknown capabilities {sorted(unknown)}; known: {', '.join(CAPABILITIES)}"
            )
        return value

    @field_validator("quality")
    @classmethod
    def _known_skills(cls, value: dict[str, float]) -> dict[str, float]:
        for skill, score in value.items():
            if skill not in SKILLS:
                raise ValueError(f"unknown skill {skill!r}; known: {', '.join(SKILLS)}")
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"quality score for {skill!r} must be in 0..1, got {score}")
        return value

    @cached_property
    def key(self) -> str:
        """`provider/model`: the name used everywhere else (needs, ledger, events)."""
        # Read several times per routed call: built once (the spec is frozen).
        return f"{self.provider}/{self.model}"

    def __str__(self) -> str:
        return self.key

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Self:
        """A copy; with `update`, what was derived from the old fields is derived again."""
        copy = super().model_copy(update=update, deep=deep)
        if update:  # pydantic copies the instance dict, cached properties included
            for name in _CACHED:
                copy.__dict__.pop(name, None)
        return copy

    # -- resolved from libraries -------------------------------------------------------

    @cached_property
    def adapter(self) -> ProviderAdapter:
        from .providers import adapter_for

        return adapter_for(self)

    @cached_property
    def _resolved(self) -> _Resolved:
        return _resolve(self)

    @property
    def input_price_per_mtok(self) -> float:
        return self._resolved.input_price

    @property
    def output_price_per_mtok(self) -> float:
        return self._resolved.output_price

    @property
    def window(self) -> int:
        return self._resolved.context_window

    @property
    def max_output(self) -> int:
        return self._resolved.max_output_tokens

    @property
    def caps(self) -> Capabilities:
        return self._resolved.capabilities

    @property
    def priced(self) -> bool:
        return self._resolved.priced

    @property
    def sources(self) -> dict[str, str]:
        """Where each resolved field came from ("genai-prices", "profile", "catalog", "default")."""
        return self._resolved.sources

    def estimate_cost(self, input_tokens: int, output_tokens: int) -> float:
        """USD for a call of this size at this model's base (lowest-tier) prices."""
        r = self._resolved
        return (input_tokens * r.input_price + output_tokens * r.output_price) / 1e6

    def cost(self, usage: Usage, tier: Tier | str = Tier.STANDARD,
             at: datetime | None = None) -> float:
        """USD for a call's reported usage on `tier`, made at `at` (None: now; off_peak: in
        its next cheaper window); genai-prices handles token tiers, cached tokens, its
        batch / flex price variants and time-of-day prices (see `frugalflow.tiers`)."""
        if tier is Tier.STANDARD and (at is None or self._resolved.linear):
            # Linear: the same at every hour (a simulated model is charged its list price).
            return self._standard_cost(usage)
        return _tier_cost(self, usage, Tier(tier), at)

    def _standard_cost(self, usage: Usage) -> float:
        r = self._resolved
        if (self.input_price is None or self.output_price is None) and r.priced and not r.linear:
            try:
                return float(_genai_price(self, usage))
            except LookupError:
                pass
        return self._linear_cost(usage, r.input_price, r.output_price)

    def _linear_cost(self, usage: Usage, input_price: float, output_price: float) -> float:
        """USD at these per-million prices, cached input at the entry's cached/input ratio."""
        r = self._resolved
        cached = usage.cache_read_tokens
        cached_price = r.cached_input_price if r.cached_input_price is not None else r.input_price
        if input_price != r.input_price:
            cached_price = cached_price * input_price / r.input_price if r.input_price else 0.0
        return (
            (usage.input_tokens - cached) * input_price
            + cached * cached_price
            + usage.output_tokens * output_price
        ) / 1e6

    @cached_property
    def _tier_memo(self) -> dict[Any, Any]:
        """Per-spec cache of `frugalflow.tiers` (terms, windows, per-tier prices)."""
        return {}

    def mean_quality(self, skills: Iterable[str] | None = None) -> float:
        names = list(skills) if skills is not None else list(self.quality)
        scores = [self.quality[s] for s in names if s in self.quality]
        return sum(scores) / len(scores) if scores else 0.0

    def build(self, *, timeout: float | None = None) -> BaseChatModel:
        """Construct the LangChain chat model, reading the key from `api_key_env` now."""
        return self.adapter.build(self, timeout=timeout)


def _genai_price(spec: ModelSpec, usage: Usage, price_context: dict[str, str] | None = None,
                 at: datetime | None = None) -> float:
    from genai_prices import Usage as GUsage
    from genai_prices import calc_price

    provider, model = _price_ref(spec)
    try:
        result = calc_price(
            GUsage(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                cache_read_tokens=usage.cache_read_tokens or None,
                cache_write_tokens=usage.cache_write_tokens or None,
            ),
            model,
            provider_id=provider,
            genai_request_timestamp=at,
            price_context=price_context,
        )
    except LookupError:
        raise
    except Exception as e:  # genai-prices raises plain errors for unknown models
        raise LookupError(str(e)) from e
    return float(result.total_price)


def _tier_cost(spec: ModelSpec, usage: Usage, tier: Tier, at: datetime | None) -> float:
    """`ModelSpec.cost` on a tier or at a time: the entry's own tier prices, else its
    discount, else genai-prices' variant, else the tier's fallback discount (tiers.toml) of
    the standard price at `at`."""
    if tier is Tier.OFF_PEAK:
        if at is None:
            window = next_off_peak(spec, datetime.now(UTC))
            at = window[0] if window is not None else None
        tier = Tier.STANDARD
    if tier is Tier.STANDARD:
        return _standard_at(spec, usage, at)
    override = spec.tiers.get(tier.value)
    if override is not None and override.input_price is not None:
        assert override.output_price is not None  # TierOverride sets both or neither
        return spec._linear_cost(usage, override.input_price, override.output_price)
    if override is not None and override.discount is not None:
        return override.discount * _standard_at(spec, usage, at)
    if has_variant(spec, tier, at):
        try:
            return _genai_price(spec, usage, tier.price_context, at)
        except LookupError:
            pass
    terms = tier_terms(spec, tier)
    discount = terms.discount if terms is not None else _fallback_discount(tier)
    if discount is None:
        raise CatalogError(
            f"{spec.key}: no {tier.value} price (genai-prices has no {tier.value} price for "
            f"it and the tier has no fallback discount); set tiers.{tier.value}.discount or "
            "input_price/output_price in its catalog entry")
    return discount * _standard_at(spec, usage, at)


def _fallback_discount(tier: Tier) -> float | None:
    from .tiers import _data

    value = _data().get("defaults", {}).get(tier.value, {}).get("discount")
    return float(value) if value is not None else None


def _standard_at(spec: ModelSpec, usage: Usage, at: datetime | None) -> float:
    """The standard cost of `usage` for a call made at `at` (None: now)."""
    r = spec._resolved
    if at is None or not r.priced or (spec.input_price is not None
                                      and spec.output_price is not None):
        return spec._standard_cost(usage)
    try:  # time-of-day prices: genai-prices at that time (even where unit prices are linear)
        return float(_genai_price(spec, usage, None, at))
    except LookupError:
        return spec._standard_cost(usage)


_CACHED = tuple(name for name, value in vars(ModelSpec).items()
                if isinstance(value, cached_property))
"""ModelSpec's derived values, computed once per (frozen) spec."""


def _resolve(spec: ModelSpec) -> _Resolved:
    sources: dict[str, str] = {}
    inp, out, cached, priced, linear = _resolve_prices(spec, sources)
    profile = _profile(spec)

    def pick(name: str, override: int | None, prof_key: str, default: int) -> int:
        if override is not None:
            sources[name] = "catalog"
            return override
        value = profile.get(prof_key)
        if value:
            sources[name] = "profile"
            return int(value)
        sources[name] = "default"
        return default

    window = pick("context_window", spec.context_window, "max_input_tokens", _DEFAULT_CONTEXT)
    max_out = pick("max_output_tokens", spec.max_output_tokens, "max_output_tokens", _DEFAULT_MAX_OUTPUT)
    return _Resolved(
        input_price=float(inp),
        output_price=float(out),
        cached_input_price=cached,
        context_window=int(window),
        max_output_tokens=int(max_out),
        capabilities=_capabilities(spec, profile, sources),
        priced=priced,
        linear=linear,
        sources=sources,
    )


def _resolve_prices(
    spec: ModelSpec, sources: dict[str, str]
) -> tuple[float, float, float | None, bool, bool]:
    """(input, output, cached input) USD per million tokens, whether priced, whether linear."""
    # Prices: explicit override, else genai-prices at a small call (base tier).
    priced = True
    inp: float | None
    out: float | None
    at = None
    if spec.input_price is not None and spec.output_price is not None:
        inp, out = spec.input_price, spec.output_price
        sources["price"] = "catalog"
    else:
        try:
            # Per-token price of a 10k-token call: tiered models charge more past a
            # threshold, and ranking wants the price of a typical call. A price that varies
            # with the hour is taken at its list (highest) price, whatever the hour now.
            at = _list_time(spec)
            inp = spec.input_price
            if inp is None:
                inp = _genai_price(spec, Usage(input_tokens=10_000), at=at) * 100
            out = spec.output_price
            if out is None:
                out = _genai_price(spec, Usage(output_tokens=10_000), at=at) * 100
            sources["price"] = "genai-prices"
        except LookupError:
            if not spec.local:
                log.warning(
                    "frugalflow: no price for %s in genai-prices (price_ref=%s); treating it as "
                    "free. Set input_price/output_price in the catalog entry.",
                    spec.key,
                    spec.price_ref or f"{spec.provider}:{spec.model}",
                )
            priced = False
            inp = spec.input_price or 0.0
            out = spec.output_price or 0.0
            sources["price"] = "catalog" if spec.local else "missing"
    from_genai = priced and sources["price"] == "genai-prices"
    # A price that varies with the hour is not linear: each call is charged by genai-prices
    # at its own time. A simulated model is charged its list price (demos and tests do not
    # depend on the hour they run at).
    linear = from_genai and (at is None or spec.simulated) and _linear(spec, inp, out, at)
    cached = spec.cached_input_price
    if cached is None and from_genai:
        try:
            cached = _genai_price(spec, Usage(input_tokens=10_000, cache_read_tokens=10_000),
                                  at=at) * 100
        except LookupError:
            cached = None
    return inp, out, cached, priced, linear


def _list_time(spec: ModelSpec) -> datetime | None:
    """A moment today at which `spec` costs its list (highest) price, for a model whose
    genai-prices price varies with the time of day (DeepSeek's off-peak hours); None when it
    does not. Ranking compares list prices, so a node's model does not change with the hour
    it runs at; the cheaper hours are the `off_peak` tier (`frugalflow.tiers`), and every
    call is charged at its own time's price."""
    from .tiers import _bounds, model_info

    points, _ = _bounds(spec)
    info = model_info(spec)
    if not points or info is None:
        return None
    from genai_prices.types import Usage as GUsage

    midnight = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    moments = [midnight + timedelta(seconds=p + 1) for p in points]

    def price(at: datetime) -> Any:
        return info.get_prices(at).calc_price(
            GUsage(input_tokens=10_000, output_tokens=10_000))["total_price"]

    return max(moments, key=price)


def _linear(spec: ModelSpec, inp: float, out: float, at: datetime | None = None) -> bool:
    """Whether genai-prices has no tiers for `spec` (at `at`): then its unit prices give the
    exact cost of any call (tiered prices need genai-prices for every call)."""
    try:
        big_in = _genai_price(spec, Usage(input_tokens=1_000_000), at=at)
        big_out = _genai_price(spec, Usage(output_tokens=1_000_000), at=at)
        big_cached = _genai_price(spec, Usage(input_tokens=1_000_000, cache_read_tokens=1_000_000),
                                  at=at)
        small_cached = _genai_price(spec, Usage(input_tokens=10_000, cache_read_tokens=10_000),
                                    at=at)
    except LookupError:
        return False
    return (
        abs(big_in - inp) < 1e-9 * max(inp, 1)
        and abs(big_out - out) < 1e-9 * max(out, 1)
        and abs(big_cached - small_cached * 100) < 1e-9 * max(big_cached, 1)
    )


def _profile(spec: ModelSpec) -> Mapping[str, Any]:
    """The integration's model profile, when the entry leaves anything for it to fill."""
    if spec.context_window and spec.max_output_tokens and _all_caps(spec):
        return {}
    try:
        return spec.adapter.profile(spec) or {}
    except Exception as e:  # a missing or broken integration leaves the profile empty
        log.debug("frugalflow: no profile for %s: %s", spec.key, e)
        return {}


def _capabilities(spec: ModelSpec, profile: Mapping[str, Any],
                  sources: dict[str, str]) -> Capabilities:
    caps: dict[str, bool] = {}
    from_profile = {
        "tool_calling": profile.get("tool_calling"),
        # With tool calling, LangChain produces structured output through a forced tool call.
        "structured_output": profile.get("structured_output") or profile.get("tool_calling"),
        "vision": profile.get("image_inputs"),
        "reasoning": profile.get("reasoning_output"),
        "streaming": True if profile else None,
    }
    for cap in CAPABILITIES:
        if cap in spec.capabilities:
            caps[cap] = spec.capabilities[cap]
            sources[cap] = "catalog"
        elif from_profile.get(cap) is not None:
            caps[cap] = bool(from_profile[cap])
            sources[cap] = "profile"
        else:
            caps[cap] = cap == "streaming"
            sources[cap] = "default"
    return Capabilities(**caps)


def _all_caps(spec: ModelSpec) -> bool:
    return all(c in spec.capabilities for c in CAPABILITIES)


class Catalog:
    """An ordered set of model specs.

    Build one from Python (`Catalog([ModelSpec(...), ...])`), a TOML or YAML file
    (`Catalog.from_file`), or take a built-in one: `Catalog.builtin()` (real providers),
    `Catalog.simulated()` (offline), `Catalog.default()` (real if any key is set, else simulated).
    """

    def __init__(
        self,
        models: Iterable[ModelSpec],
        *,
        name: str = "custom",
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.name = name
        self._models: dict[str, ModelSpec] = {}
        for spec in models:
            if spec.key in self._models:
                raise CatalogError(f"catalog {name!r} lists {spec.key!r} twice; keep one entry")
            # An unknown provider, or a custom endpoint without its URL, is a catalog error
            # now, not at call time (and no key ever goes to a vendor's default URL).
            try:
                spec.adapter.validate(spec)
            except CatalogError as e:
                raise CatalogError(f"catalog {name!r}: {e}") from None
            self._models[spec.key] = spec
        self._env = env
        self._built: dict[tuple[str, float | None], tuple[int, BaseChatModel]] = {}
        self._prefilters: dict[tuple[Any, ...], tuple[int, Prefilter]] = {}
        self._key_envs = sorted(
            {var for s in self._models.values() if (var := s.adapter.key_env(s))}
        )
        # Their values are secrets: scrubbed from everything written at rest and the logs.
        from .persistence.scrub import install_log_filter, register_key_envs

        register_key_envs(self._key_envs, env)
        install_log_filter()  # also on frugalflow.* loggers created since the last call

    async def aclose(self) -> None:
        """Close the HTTP clients of every model this catalog built (they are rebuilt on use)."""
        built, self._built = self._built, {}
        for (key, _timeout), (_hash, model) in built.items():
            await self._models[key].adapter.aclose(model)

    def prefiltered(self, needs: Needs,
                    compute: Callable[[Catalog, Needs], Prefilter]) -> Prefilter:
        """`compute(self, needs)`, cached per needs while the providers' keys stay the same."""
        env_hash = hash(tuple(self._getenv(e) for e in self._key_envs)) if self._key_envs else 0
        hit = self._prefilters.get(needs.cache_key)
        if hit is None or hit[0] != env_hash:
            hit = self._prefilters[needs.cache_key] = (env_hash, compute(self, needs))
        return hit[1]

    def built(self, spec: ModelSpec, *, timeout: float | None = None) -> BaseChatModel:
        """`spec` built as a LangChain chat model, reused while its key stays the same."""
        env_name = spec.adapter.key_env(spec)
        # A changed key rebuilds the model; the cache remembers only the key's hash.
        key_hash = hash(self._getenv(env_name) or "") if env_name else 0
        hit = self._built.get((spec.key, timeout))
        if hit is None or hit[0] != key_hash:
            hit = self._built[(spec.key, timeout)] = (key_hash, spec.build(timeout=timeout))
        return hit[1]

    # -- loading ---------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, name: str = "custom") -> Catalog:
        """Build from `{"models": [...], "quality": {ref: {skill: score | {score, source}}}}`."""
        unknown = set(data) - {"models", "quality", "name"}
        if unknown:
            raise CatalogError(
                f"catalog {name!r}: unknown top-level keys {sorted(unknown)}; "
                "expected 'models' (a list of model entries) and optionally 'quality'"
            )
        quality_table = _with_builtin_scores(data.get("quality") or {})
        entries = data.get("models")
        if not isinstance(entries, list) or not entries:
            raise CatalogError(f"catalog {name!r} has no 'models' list; add [[models]] entries")
        specs = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, Mapping):
                raise CatalogError(f"catalog {name!r}: models[{i}] is not a table")
            entry = dict(entry)
            ref = str(entry.get("quality_ref")
                      or _builtin_refs().get(f"{entry.get('provider')}/{entry.get('model')}")
                      or entry.get("model"))
            scores, srcs = _parse_quality(quality_table.get(ref, {}), name, ref)
            inline, inline_srcs = _parse_quality(entry.pop("quality", {}), name, ref)
            scores.update(inline)
            srcs.update(inline_srcs)
            srcs.update(entry.pop("quality_sources", {}))
            label = f"{entry.get('provider', '?')}/{entry.get('model', '?')}"
            try:
                specs.append(ModelSpec(**entry, quality=scores, quality_sources=srcs))
            except ValidationError as e:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc']) or 'entry'}: {err['msg']}"
                    for err in e.errors()
                )
                raise CatalogError(
                    f"catalog {name!r}, models[{i}] ({label}): {problems}"
                ) from None
        return cls(specs, name=data.get("name", name))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Catalog:
        """Load a `.toml`, `.yaml` or `.yml` catalog file."""
        p = Path(path)
        if not p.exists():
            raise CatalogError(f"catalog file {str(p)!r} does not exist")
        try:
            if p.suffix == ".toml":
                data = tomllib.loads(p.read_text())
            elif p.suffix in (".yaml", ".yml"):
                data = _load_yaml(p)
            else:
                raise CatalogError(
                    f"catalog file {str(p)!r}: unknown format; use .toml, .yaml or .yml"
                )
        except (tomllib.TOMLDecodeError, ValueError) as e:
            raise CatalogError(f"catalog file {str(p)!r} does not parse: {e}: fix the TOML "
                               "there (see the README's catalog example)") from None
        if not isinstance(data, Mapping):
            raise CatalogError(f"catalog file {str(p)!r} must hold a table at the top level")
        return cls.from_dict(data, name=p.stem)

    @classmethod
    def builtin(cls) -> Catalog:
        """Real providers: OpenAI, Anthropic, Gemini, DeepSeek, Mistral, Groq, Together, Ollama."""
        return cls.from_dict(_builtin_data("catalog.toml"), name="builtin")

    @classmethod
    def simulated(cls) -> Catalog:
        """Offline models that mirror real providers' price tiers (no network, no keys)."""
        return cls.from_dict(_builtin_data("simulated.toml"), name="simulated")

    @classmethod
    def default(cls) -> Catalog:
        """The real catalog when any remote provider's key is set, else the simulated one.

        `FRUGALFLOW_CATALOG` (a file path) overrides both.
        """
        path = os.environ.get("FRUGALFLOW_CATALOG")
        if path:
            return cls.from_file(path)
        real = cls.builtin()
        if any(real.is_available(s) and not s.local for s in real):
            return real
        return cls.simulated()

    # -- access ----------------------------------------------------------------------

    def __iter__(self) -> Iterator[ModelSpec]:
        return iter(self._models.values())

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, key: object) -> bool:
        return key in self._models

    def __getitem__(self, key: str) -> ModelSpec:
        try:
            return self._models[key]
        except KeyError:
            close = difflib.get_close_matches(key, list(self._models), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise CatalogError(f"no model {key!r} in catalog {self.name!r}{hint}") from None

    @property
    def providers(self) -> list[str]:
        return sorted({s.provider for s in self})

    def override(self, key: str, **fields: Any) -> Catalog:
        """A copy where model `key` has `fields` replaced (e.g. prices, capabilities)."""
        spec = self[key]
        try:
            new = ModelSpec(**{**spec.model_dump(), **fields})
        except ValidationError as e:
            raise CatalogError(f"override of {key!r}: {e}") from None
        return Catalog(
            (new if s.key == key else s for s in self), name=self.name, env=self._env
        )

    def extend(self, models: Iterable[ModelSpec]) -> Catalog:
        return Catalog([*self, *models], name=self.name, env=self._env)

    # -- availability ----------------------------------------------------------------

    def _getenv(self, name: str) -> str | None:
        env = self._env if self._env is not None else os.environ
        return env.get(name) or None

    def unavailable_reason(self, spec: ModelSpec) -> str | None:
        """Why `spec` cannot be called in this process, or None when it can."""
        adapter = spec.adapter
        if not adapter.installed():
            return f"integration not installed: pip install 'frugalflow[{adapter.extra}]'"
        if spec.simulated:
            return None
        env_name = spec.api_key_env or adapter.key_env(spec)
        if env_name and not self._getenv(env_name):
            return f"provider not configured: set {env_name}"
        return None

    def is_available(self, spec: ModelSpec) -> bool:
        return self.unavailable_reason(spec) is None

    def available(self) -> list[ModelSpec]:
        return [s for s in self if self.is_available(s)]

    def strongest(self, skills: Iterable[str] | None = None) -> ModelSpec:
        """The available model with the highest mean quality (over `skills`, default all)."""
        pool = self.available() or list(self)
        names = list(skills) if skills is not None else list(SKILLS)
        return max(pool, key=lambda s: (s.mean_quality(names), s.output_price_per_mtok))


def _parse_quality(
    table: Mapping[str, Any], catalog: str, ref: str | None
) -> tuple[dict[str, float], dict[str, str]]:
    scores: dict[str, float] = {}
    srcs: dict[str, str] = {}
    for skill, value in table.items():
        if isinstance(value, Mapping):
            if "score" not in value:
                raise CatalogError(f"catalog {catalog!r}: quality {ref}.{skill} has no 'score'")
            scores[skill] = float(value["score"])
            if "source" in value:
                srcs[skill] = str(value["source"])
        else:
            scores[skill] = float(value)
    return scores, srcs


@functools.cache
def _builtin_quality() -> Mapping[str, Mapping[str, Any]]:
    """The built-in score table (quality.toml), by canonical model key."""
    return tomllib.loads((resources.files("frugalflow") / "data" / "quality.toml").read_text())


@functools.cache
def _builtin_refs() -> Mapping[str, str]:
    """`provider/model` of each built-in model -> its key in the score table."""
    data = tomllib.loads((resources.files("frugalflow") / "data" / "catalog.toml").read_text())
    return {f"{m['provider']}/{m['model']}": m["quality_ref"]
            for m in data.get("models", []) if "quality_ref" in m}


def _with_builtin_scores(own: Mapping[str, Any]) -> dict[str, Any]:
    """A catalog's score table over the built-in one: a model a file names inherits the built-in
    scores of its key, and the file's own scores win skill by skill."""
    merged: dict[str, Any] = {ref: dict(scores) for ref, scores in _builtin_quality().items()}
    for ref, scores in own.items():
        if isinstance(scores, Mapping) and isinstance(merged.get(ref), dict):
            merged[ref].update(scores)
        else:
            merged[ref] = scores
    return merged


def _load_yaml(path: Path) -> Any:
    """A YAML file's data; a syntax error is a one-line CatalogError with its line, column
    and the fix (PyYAML's own message spans several lines and quotes the source)."""
    import yaml

    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        where = f" (at line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise CatalogError(
            f"catalog file {str(path)!r} does not parse: {problem}{where}: fix the YAML there "
            "(indentation, a missing ':' or a closing bracket)") from None


def _builtin_data(filename: str) -> dict[str, Any]:
    """A built-in catalog file (its models' scores come from quality.toml in `from_dict`)."""
    text = (resources.files("frugalflow") / "data" / filename).read_text()
    data: dict[str, Any] = tomllib.loads(text)
    return data
