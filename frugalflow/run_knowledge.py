"""What a run starting now knows: the router (learned or prior), the node policy, the
production measurements and the output-token estimates, each the newest stored version
(so every worker picks up a `frugalflow router train` or `eval --save-policy`).

`RunKnowledge` is the Runner's part that reads them; the Runner mixes it in.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .exceptions import UserError
from .measured import MeasureConfig, unknown_policy
from .policies import Policy

if TYPE_CHECKING:
    from .catalog import Catalog
    from .flow import Flow
    from .learning import Featurizer, LearnedRouter, Router
    from .measured import Measurements
    from .persistence.ledger import Ledger
    from .persistence.store import Store
    from .verbosity import Verbosity, VerbosityCache

__all__ = ["RunKnowledge"]


class RunKnowledge:
    """The router, node policy, measurements and output estimates for runs starting now."""

    store: Store
    ledger: Ledger
    catalog: Catalog
    verbosity: VerbosityCache
    router: Router | None
    _router_name: str | None
    _router_version: int | None

    async def retrain_router(
        self, name: str | None = None, *, flow: str | None = None, node: str | None = None,
        min_examples: int = 20, featurizer: Featurizer | None = None,
    ) -> LearnedRouter | None:
        """Train a router on the ledger's outcomes, store it as a new version of `name`
        (default: the runner's router name, else "default") and use it for the next runs.
        `featurizer`: lexical features unless given (e.g. `EmbeddingFeaturizer()`).
        Returns the router, or None when the ledger holds fewer than `min_examples`."""
        from .learning import examples_from, train_router

        name = name or self._router_name or "default"
        examples = examples_from(await self.ledger.outcomes(flow=flow, node=node))
        if len(examples) < min_examples:
            return None
        router = await asyncio.to_thread(train_router, examples, self.catalog,
                                         featurizer=featurizer)
        self._router_version = await self.ledger.save_router(
            name, router, examples=len(examples),
            metrics={"flow": flow, "node": node, "successes": sum(e.success for e in examples)})
        self._router_name = name
        self.router = router
        return router

    async def _current_router(self) -> Router | None:
        """The router for a run starting now (a named one: its newest stored version)."""
        name = self._router_name
        if name is None:
            return self.router
        version = await self.ledger.router_version(name)
        if version is None:
            if self.router is None:
                from .learning import PriorRouter

                self.router = PriorRouter.from_catalog(self.catalog)
        elif version != self._router_version:
            from .learning import LearnedRouter

            self.router = await self.ledger.load_router(
                name, version, decode=LearnedRouter.from_bytes)
            self._router_version = version
        return self.router

    def _init_measuring(self, policy: Policy | str | None, measure: MeasureConfig | bool | None,
                        explore: float | Mapping[str, float]) -> None:
        shares = explore.values() if isinstance(explore, Mapping) else [explore]
        if not all(0.0 <= float(v) <= 1.0 for v in shares):
            raise UserError(f"explore must be a share of calls between 0 and 1 (one, or per "
                            f"node), got {explore!r}")
        self.explore = explore
        """Share of calls of validated nodes that may try a cheaper, unproven model first."""
        self._policy_name: str | None = policy if isinstance(policy, str) else None
        self._policy_version: int | None = None
        self.policy: Policy | None = policy if isinstance(policy, Policy) else None
        """The node policy in use (`frugalflow.policies`); given by name, the runner uses its
        newest stored version (checked at each run's start, so every worker picks up a new
        `frugalflow eval --save-policy`)."""
        on = measure if measure is not None else (
            policy is not None or any(float(v) > 0 for v in shares))
        self.measure: MeasureConfig | None = (
            measure if isinstance(measure, MeasureConfig) else MeasureConfig() if on else None)
        """How production verdicts are measured (None: not; a policy's evidence still
        counts). By default on with a policy or exploration."""
        self._measured: dict[str, tuple[object, Measurements]] = {}

    async def _check_policy(self) -> None:
        """Raise UserError for a policy name nothing is stored under (checked until found)."""
        if self._policy_name is not None and self._policy_version is None:
            await self.current_policy()

    async def current_policy(self) -> tuple[Policy | None, str | None]:
        """The node policy for a run starting now (a named one: its newest stored version),
        with its label for route reasons (`policy <name> v<k>`)."""
        name = self._policy_name
        if name is None:
            return self.policy, None
        from .persistence.policy_store import PolicyStore

        policies = PolicyStore(self.store)
        version = await policies.version(name)
        if version is None:
            raise unknown_policy(name, {p.name for p in await policies.list()})
        if version != self._policy_version or self.policy is None:
            stored = await policies.load(name, version)
            assert stored is not None  # versions are never deleted
            self.policy, self._policy_version = stored.policy, version
        return self.policy, f"policy {name} v{version}"

    async def _current_verbosity(self, flow: str) -> Verbosity:
        """Output-token estimates for a run of `flow` starting now: the ledger's (cached
        briefly), and the node policy's evidence (`current_policy`, read just before)."""
        verbosity = await self.verbosity.get(self.store, flow)
        policy = self.policy
        return verbosity.with_policy(policy) if policy is not None and policy.flow == flow \
            else verbosity

    async def _current_measurements(self, flow: Flow[Any]) -> Measurements | None:
        """What was measured of `flow` for a run starting now: the policy's newest version
        at once, production verdicts reloaded after `measure.ttl` seconds."""
        from .measured import load_measurements

        policy, label = await self.current_policy()
        if self.measure is None and (policy is None or policy.flow != flow.name):
            return None
        key = (label, id(policy))
        hit = self._measured.get(flow.name)
        config = self.measure or MeasureConfig()
        if hit is not None and hit[0] == key and (
                self.measure is None or time.monotonic() - hit[1].loaded_at < config.ttl):
            return hit[1]
        validated = {n for n, spec in flow.nodes.items() if spec.validator is not None}
        measured = await load_measurements(self.store, flow.name, validated=validated,
                                           policy=policy, label=label, config=config,
                                           production=self.measure is not None)
        self._measured[flow.name] = (key, measured)
        return measured
