"""OpenTelemetry metrics of model calls: GenAI client token usage and duration, cost, attempts
by outcome, and circuit-breaker state changes (through the metrics API only).

Names, units and attributes of `gen_ai.client.token.usage` and
`gen_ai.client.operation.duration` follow the GenAI semantic conventions (their advisory
bucket boundaries too); the `frugalflow.*` instruments are this library's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..statuses import Outcome

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.util.types import Attributes

    from ..usage import Attempt

__all__ = ["CallMetrics", "provider_name", "request_model"]

# gen_ai.provider.name: the convention's well-known value where one applies (it MUST then be
# used); frugalflow's own provider name otherwise (a custom value is allowed).
_PROVIDERS = {
    "openai": "openai", "anthropic": "anthropic", "google": "gcp.gemini",
    "gemini": "gcp.gemini", "vertex": "gcp.vertex_ai", "deepseek": "deepseek", "groq": "groq",
    "mistral": "mistral_ai", "cohere": "cohere", "xai": "x_ai", "perplexity": "perplexity",
    "bedrock": "aws.bedrock", "azure": "azure.ai.openai",
}

# Advisory boundaries from the conventions (tokens; seconds).
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                  16777216, 67108864]
_DURATION_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                     40.96, 81.92]


def provider_name(provider: str) -> str:
    """`gen_ai.provider.name` of a catalog provider (Google's AI Studio API: gcp.gemini)."""
    return _PROVIDERS.get(provider, provider)


def request_model(attempt: Attempt) -> str:
    """The provider's name of the model (the catalog key without its `provider/` prefix)."""
    prefix = attempt.provider + "/"
    return attempt.model[len(prefix):] if attempt.model.startswith(prefix) else attempt.model


class CallMetrics:
    """The instruments, created once per meter provider; `attempt` records one model call."""

    def __init__(self, meter_provider: MeterProvider, version: str) -> None:
        meter = meter_provider.get_meter("frugalflow", version)
        self.tokens = meter.create_histogram(
            "gen_ai.client.token.usage", unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS)
        self.duration = meter.create_histogram(
            "gen_ai.client.operation.duration", unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=_DURATION_BUCKETS)
        self.cost = meter.create_counter(
            "frugalflow.cost", unit="USD", description="Spend on model calls, in US dollars.")
        self.attempts = meter.create_counter(
            "frugalflow.attempts", unit="{attempt}",
            description="Model call attempts, by outcome (ok, error, replayed).")
        self.breaker_changes = meter.create_counter(
            "frugalflow.breaker.transitions", unit="{transition}",
            description="Circuit breaker state changes, by breaker and from/to state.")

    def attempt(self, attempt: Attempt, flow: str) -> None:
        """Record one ended attempt (a replayed one counts as an attempt, nothing else)."""
        provider = provider_name(attempt.provider)
        common: dict[str, str] = {"frugalflow.flow": flow, "frugalflow.node": attempt.node,
                                  "frugalflow.outcome": str(attempt.outcome)}
        if attempt.outcome == Outcome.REPLAYED:
            self.attempts.add(1, common)
            return
        model = request_model(attempt)
        call: dict[str, str] = {"gen_ai.operation.name": "chat", "gen_ai.provider.name": provider,
                                "gen_ai.request.model": model}
        if attempt.error_class is not None:
            call["error.type"] = str(attempt.error_class)
        elif attempt.outcome == Outcome.OK:
            call["gen_ai.response.model"] = response_model(attempt) or model
        self.attempts.add(1, {**common, **call})
        self.duration.record(attempt.latency_ms / 1000.0, call)
        if attempt.cost_usd:
            self.cost.add(attempt.cost_usd, {**common, "gen_ai.provider.name": provider,
                                             "gen_ai.request.model": model})
        usage = attempt.usage
        if usage is not None and attempt.outcome == Outcome.OK:
            # Token usage is recorded for calls that answered (the convention's "when
            # available"); a failed call's billed tokens are in its cost.
            self.tokens.record(usage.input_tokens, {**call, "gen_ai.token.type": "input"})
            self.tokens.record(usage.output_tokens, {**call, "gen_ai.token.type": "output"})

    def breaker_changed(self, key: str, before: str, after: str) -> None:
        provider, _, model = key.partition("/")
        attrs: Attributes = {"frugalflow.breaker.key": key,
                             "frugalflow.breaker.scope": "model" if model else "provider",
                             "gen_ai.provider.name": provider_name(provider),
                             "frugalflow.breaker.from": before, "frugalflow.breaker.to": after}
        self.breaker_changes.add(1, attrs)


def response_model(attempt: Attempt) -> str | None:
    """The model the provider says answered (`model_name`/`model` in the response metadata)."""
    meta = getattr(attempt.response, "response_metadata", None)
    if not isinstance(meta, dict):
        return None
    name = meta.get("model_name") or meta.get("model")
    return name if isinstance(name, str) and name else None
