"""A RoutedChatModel used as a plain LangChain chat model, outside any run, in a long-lived
process: its default context keeps totals and a bounded window of attempts, so memory stays
flat however many calls it makes (issue 11, item 1)."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import pytest
from langchain_core.messages import HumanMessage

from frugalflow import Catalog, RoutedChatModel, RunUsage, routed
from frugalflow.resilience import BreakerRegistry
from frugalflow.usage import Attempt
from frugalflow.routed import DEFAULT_ATTEMPT_WINDOW
from frugalflow.usage import Usage


@pytest.mark.slow
async def test_many_calls_outside_a_run_keep_memory_flat_and_totals_right(
    sim: Any, monkeypatch: Any
) -> None:
    # A smaller window than the default (1,000) keeps the test short: the bound is the same.
    monkeypatch.setattr(routed, "DEFAULT_ATTEMPT_WINDOW", 100)
    model = RoutedChatModel(Catalog.simulated())  # zero latency: simulated, no sleeping
    model.context.breakers = BreakerRegistry()  # type: ignore[union-attr]
    usage = model.context.usage  # type: ignore[union-attr]

    async def calls(n: int, start: int) -> float:
        cost = 0.0
        for i in range(start, start + n):
            # Distinct prompts, as a service's traffic is (nothing cached by content).
            answer = await model.ainvoke([HumanMessage(f"classify ticket {i}: refund please")])
            cost += answer.response_metadata["frugalflow"]["cost_usd"]
        return cost

    tracemalloc.start()  # from the first call: the window's old attempts are traced too
    try:
        spent = await calls(300, 0)
        gc.collect()
        before = tracemalloc.take_snapshot()
        spent += await calls(1700, 300)
        gc.collect()
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    growth = sum(s.size_diff for s in after.compare_to(before, "filename"))
    # Unbounded, 1,700 more attempts kept about 2.5 KB each (4 MB); bounded, nothing grows
    # with the number of calls (allow 400 KB for caches and allocator noise).
    assert growth < 400_000, f"memory grew by {growth} bytes over 1,700 calls"
    assert len(usage.attempts) == 100
    assert usage.recorded == sum(sim.calls[k] for k in sim.calls if "/" in k) == 2000
    assert abs(usage.spent_usd - spent) < 1e-9
    assert abs(sum(usage.cost_by("model").values()) - spent) < 1e-9
    assert abs(sum(usage.cost_by("provider").values()) - spent) < 1e-9
    assert usage.usage.requests == 2000 and usage.usage.output_tokens > 0


def test_the_default_window_is_bounded() -> None:
    model = RoutedChatModel(Catalog.simulated())
    assert model.context is not None
    assert model.context.usage.max_attempts == DEFAULT_ATTEMPT_WINDOW == 1000


def test_a_run_usage_without_a_window_keeps_every_attempt() -> None:
    usage = RunUsage()
    window = RunUsage(max_attempts=3)
    for i in range(10):
        a = Attempt(node=f"n{i % 2}", model="p/m", provider="p", outcome="ok", cost_usd=1.0,
                    usage=Usage(input_tokens=2, output_tokens=1, requests=1))
        usage.record(a)
        window.record(a)
    assert len(usage.attempts) == 10 and len(window.attempts) == 3
    assert window.attempts == usage.attempts[-3:]
    for u in (usage, window):
        assert u.recorded == 10 and u.spent_usd == 10.0
        assert u.cost_by("node") == {"n0": 5.0, "n1": 5.0}
        assert u.usage == Usage(input_tokens=20, output_tokens=10, requests=10)
