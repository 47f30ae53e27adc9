"""Service tiers: the same model at another price for an answer that may come later.

`Tier.STANDARD` is the usual synchronous call; `FLEX` a synchronous call on a slower,
cheaper service tier (OpenAI's and Gemini's flex); `BATCH` a request sent in a provider
batch (OpenAI Batch API, Anthropic Message Batches, Gemini batch mode), answered within
hours at about half the price; `OFF_PEAK` a standard call made in a cheaper time-of-day
window (DeepSeek's). A node whose needs set a `deadline` may be routed to any tier that can
answer before it; the run parks (status `waiting`) on the tiers that answer later.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Tier"]


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
