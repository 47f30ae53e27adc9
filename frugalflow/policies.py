"""Node policies: per node of a flow, what was measured of each model and which to use.

An evaluation (`frugalflow eval --save-policy NAME`) stores one as the next version of
NAME; runs started with `Runner(policy=NAME)` (`--policy` on run, serve and worker) pick up
its newest version when they start. A policy's evidence is what ranking judges quality
needs on where it exists (the catalog's prior elsewhere), and its choice is the model (or
stated random mix of two) a node tries first.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["Choice", "Evidence", "NodePolicy", "Policy"]


class Evidence(BaseModel):
    """What was measured of one model on one node."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int = Field(ge=0)
    """Cases answered and scored."""
    passes: int = Field(ge=0)
    errors: int = Field(default=0, ge=0)
    """Cases with no answer or no score (not in n)."""
    cost_usd: float = Field(default=0.0, ge=0)
    """Mean cost per call."""
    latency_ms_p50: float | None = None
    output_tokens_p50: float | None = None
    output_tokens_p90: float | None = None
    reasoning_tokens_p50: float | None = None
    reasoning_tokens_p90: float | None = None
    source: str = ""
    """Where it was measured (`eval:<id>`), for explain and the audit trail."""

    @model_validator(mode="after")
    def _passes_within_n(self) -> Evidence:
        if self.passes > self.n:
            raise ValueError(f"passes ({self.passes}) cannot exceed n ({self.n})")
        return self


class Choice(BaseModel):
    """The model a node tries first, or a random mix of two with stated shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: tuple[str, ...] = Field(min_length=1, max_length=2)
    shares: tuple[float, ...] = ()
    """Per model, the share of calls (sums to 1); empty for a single model."""
    target: float | None = Field(default=None, ge=0, le=1)
    """The pass rate the choice was made for (judged on interval lower bounds)."""
    expected_pass: float | None = None
    expected_cost_usd: float | None = None

    @model_validator(mode="after")
    def _shares_fit(self) -> Choice:
        if len(self.models) == 2 and (len(self.shares) != 2 or abs(sum(self.shares) - 1) > 1e-6):
            raise ValueError("a mix of two models states both shares, summing to 1")
        if len(self.models) == 1 and self.shares not in ((), (1.0,)):
            raise ValueError("a single model takes every call: give no shares")
        return self


class NodePolicy(BaseModel):
    """One node: the evidence per model key (`provider/model`) and the choice, if any."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: dict[str, Evidence] = Field(default_factory=dict)
    choice: Choice | None = None


class Policy(BaseModel):
    """A flow's node policies, as stored (one JSON body per version of a name)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    flow: str
    nodes: dict[str, NodePolicy] = Field(default_factory=dict)
    source: str | None = None
