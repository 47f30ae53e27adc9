"""Node policies: their shape is checked, and stored versions round-trip (newest wins)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from frugalflow.persistence.policy_store import PolicyStore
from frugalflow.persistence.store import Store
from frugalflow.policies import Choice, Evidence, NodePolicy, Policy


def test_a_policy_refuses_impossible_evidence_and_unstated_mixes() -> None:
    with pytest.raises(ValidationError, match="cannot exceed"):
        Evidence(n=3, passes=4)
    with pytest.raises(ValidationError, match="both shares"):
        Choice(models=("a/x", "b/y"))
    with pytest.raises(ValidationError, match="give no shares"):
        Choice(models=("a/x",), shares=(0.5,))
    assert Choice(models=("a/x", "b/y"), shares=(0.25, 0.75)).shares == (0.25, 0.75)


async def test_stored_policies_are_versioned_and_the_newest_is_loaded(tmp_path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'p.db'}")
    policies = PolicyStore(store)
    try:
        assert await policies.version("triage") is None and await policies.load("triage") is None
        first = Policy(flow="support_triage", nodes={"classify": NodePolicy(
            models={"openai/gpt-5-nano": Evidence(n=50, passes=47, cost_usd=0.0001)},
            choice=Choice(models=("openai/gpt-5-nano",), target=0.9))})
        assert await policies.save("triage", first, source="eval:1") == 1
        second = first.model_copy(update={"source": "eval:2"})
        assert await policies.save("triage", second) == 2
        newest = await policies.load("triage")
        assert newest is not None and newest.version == 2 and newest.source == "eval:2"
        old = await policies.load("triage", 1)
        assert old is not None and old.policy == first and old.source == "eval:1"
        assert [(p.name, p.version) for p in await policies.list()] == [("triage", 1),
                                                                        ("triage", 2)]
    finally:
        await store.close()
