"""Schema-valid fake values: what a test double answers when a JSON schema is asked for."""

from __future__ import annotations

import random
from typing import Any

__all__ = ["fake_json"]

_WORDS = (
    "the request was reviewed and the relevant details are summarised below with a clear "
    "next step for the customer including account status billing history and timing"
).split()


def fake_json(
    schema: dict[str, Any], rng: random.Random, defs: dict[str, Any] | None = None
) -> Any:
    """A value valid against a JSON schema (the subset pydantic emits), drawn from `rng`."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        return fake_json(defs[schema["$ref"].rsplit("/", 1)[-1]], rng, defs)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return rng.choice(schema["enum"])
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = [s for s in schema[key] if s.get("type") != "null"] or schema[key]
            return fake_json(options[0], rng, defs)
    if "allOf" in schema:
        return fake_json(schema["allOf"][0], rng, defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or "properties" in schema:
        return {name: fake_json(sub, rng, defs)
                for name, sub in schema.get("properties", {}).items()}
    if kind == "array":
        n = max(int(schema.get("minItems", 1)), 1)
        return [fake_json(schema.get("items", {"type": "string"}), rng, defs) for _ in range(n)]
    return _scalar(kind, schema, rng)


def _scalar(kind: Any, schema: dict[str, Any], rng: random.Random) -> Any:
    if kind == "integer":
        lo = int(schema.get("minimum", 0))
        hi = int(schema.get("maximum", lo + 10))
        return rng.randint(lo, hi)
    if kind == "number":
        low = float(schema.get("minimum", 0.0))
        high = float(schema.get("maximum", low + 1.0))
        return round(rng.uniform(low, high), 3)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    fmt = schema.get("format")
    if fmt == "date":
        return "2026-01-15"
    if fmt == "date-time":
        return "2026-01-15T10:00:00Z"
    if fmt == "email":
        return "customer@example.com"
    n = max(int(schema.get("minLength", 1)), 1)
    text = " ".join(rng.choice(_WORDS) for _ in range(3))
    return (text * (n // len(text) + 1))[: max(n, len(text))]
