"""What one call may spend under a run budget: admission, and the max output it is given.

A candidate is admitted when the budget left (less what calls in flight hold) pays for its
input and the high quantile (p90) of its output estimate: a likely answer, not the worst
case. The call is then given a max output (`max_tokens`, or the integration's name for it)
that the budget left can pay, so the budget stays a guarantee even when a model writes far
more than estimated; the call holds its most possible cost until it is recorded, so that
parallel calls of the run together stay within the budget. A call whose affordable max
output is below `MIN_USEFUL_OUTPUT` is refused.

The guarantee rests on the prompt's token estimate (about four characters a token), taken
with a margin (`INPUT_MARGIN`, `INPUT_SLACK`), and on the provider honouring the max output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .exceptions import BudgetExceededError

if TYPE_CHECKING:
    from .catalog import ModelSpec
    from .needs import Needs
    from .ranking import Candidate
    from .usage import RunUsage
    from .verbosity import TokenEstimate

__all__ = ["INPUT_MARGIN", "MIN_USEFUL_OUTPUT", "Allowance", "allowance", "budget_error",
           "max_tokens_param", "with_max_output"]

MIN_USEFUL_OUTPUT = 16
"""Below this many affordable output tokens a call is refused (no useful answer fits)."""
INPUT_MARGIN = 1.25
"""The prompt's estimated tokens are taken 25% larger when sizing the max output ..."""
INPUT_SLACK = 32
"""... plus this many (the provider's per-message template tokens the estimate misses)."""
HEADROOM = 4.0
"""A call's max output is at most this many times its estimate's high quantile ..."""
HEADROOM_FLOOR = 2048
"""... or this many tokens, whichever is more (one call must not hold the whole budget while
parallel calls of the run wait for none)."""

# The LangChain keyword that bounds a call's output, per provider adapter (ChatOpenAI sends
# `max_tokens` as max_completion_tokens; Gemini names it max_output_tokens). Ollama is local
# and free: no bound is needed for the budget.
_PARAMS = {"openai": "max_tokens", "anthropic": "max_tokens", "google": "max_output_tokens",
           "simulated": "max_tokens"}


def max_tokens_param(spec: ModelSpec) -> str | None:
    """The call keyword that bounds `spec`'s output, or None when frugalflow knows none."""
    return _PARAMS.get(spec.adapter.name)


@dataclass(frozen=True, slots=True)
class Allowance:
    """One call's share of the budget: its max output and what it holds, or why it is refused."""

    max_output: int | None = None
    """The call's bound on output tokens (None: not bounded, e.g. a free model)."""
    hold_usd: float = 0.0
    """The most the call may cost: held until it is recorded."""
    refusal: str | None = None
    needed_usd: float = 0.0
    """The input and p90 output cost: what admission reserves."""


def allowance(spec: ModelSpec, needs: Needs, n_in: int, estimate: TokenEstimate,
              left: float) -> Allowance:
    """The allowance of a call of `n_in` input tokens to `spec`, with `left` USD free."""
    p_in, p_out = spec.input_price_per_mtok / 1e6, spec.output_price_per_mtok / 1e6
    cost_in = math.ceil(n_in * INPUT_MARGIN + INPUT_SLACK) * p_in
    needed = cost_in + estimate.p90 * p_out
    if needed > left:
        return Allowance(refusal=f"over the remaining budget (${needed:.6f} for its input and "
                         f"p90 {estimate.p90:.0f} output tokens, ${left:.6f} left)",
                         needed_usd=needed)
    param = max_tokens_param(spec)
    if p_out <= 0:
        return Allowance(None, cost_in, None, needed)
    if param is None:  # no bound frugalflow can set: reserve the model's longest answer
        cap = spec.max_output
        hold = cost_in + cap * p_out
        if hold > left:
            return Allowance(refusal=f"its output cannot be bounded and its longest answer "
                             f"({cap} tokens) costs ${hold:.6f}, ${left:.6f} left",
                             needed_usd=hold)
        return Allowance(None, hold, None, needed)
    affordable = math.floor((left - cost_in) / p_out)
    configured = spec.model_kwargs.get(param)  # the catalog entry's own bound, if any
    cap = min(affordable, spec.max_output, needs.max_output_tokens or spec.max_output,
              configured if isinstance(configured, int) and configured > 0 else spec.max_output,
              max(math.ceil(HEADROOM * estimate.p90), HEADROOM_FLOOR))
    if cap < MIN_USEFUL_OUTPUT:
        return Allowance(refusal=f"over the remaining budget (only {max(cap, 0)} output tokens "
                         f"affordable, ${left:.6f} left)", needed_usd=needed)
    return Allowance(cap, cost_in + cap * p_out, None, needed)


def with_max_output(kwargs: dict[str, Any], spec: ModelSpec,
                    allowed: Allowance) -> dict[str, Any]:
    """A call's keywords with its allowance's max output (a smaller one asked is kept)."""
    param = max_tokens_param(spec)
    if allowed.max_output is None or param is None:
        return kwargs
    asked = kwargs.get(param)
    cap = min(asked, allowed.max_output) if isinstance(asked, int) else allowed.max_output
    return {**kwargs, param: cap}


def budget_error(node: str | None, usage: RunUsage, cheapest: Candidate, *,
                 needed: float | None = None, why: str | None = None) -> BudgetExceededError:
    """The run's budget cannot pay for `cheapest` (`needed`: what its admission reserves,
    default its expected cost; `why`: the allowance's refusal)."""
    needed = needed if needed is not None else cheapest.expected_cost
    detail = f" ({why})" if why else ""
    return BudgetExceededError(
        f"node {node!r}: the run's budget cannot pay for the next call: "
        f"${usage.spent_usd:.6f} of ${usage.budget_usd} spent, "
        f"${usage.remaining_usd or 0.0:.6f} left; the cheapest capable call "
        f"({cheapest.spec.key}) needs about ${needed:.6f}{detail}. "
        "Resume the run with a larger budget.",
        node=node, budget_usd=usage.budget_usd or 0.0,
        spent_usd=usage.spent_usd, needed_usd=needed,
    )
