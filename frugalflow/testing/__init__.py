"""Test doubles for frugalflow flows: an offline simulated provider and an HTTP provider emulator.

`SimulatedChatModel` (with its `Simulator`: fault plan, latency scale, oracles) is a LangChain
chat model that never touches the network. `frugalflow.testing.emulator.ProviderEmulator`
serves four real provider APIs on 127.0.0.1 for the real SDK clients, with scriptable faults
(imported from its module: registering the simulated provider does not load it).
The product never imports this package, except to register the simulated provider (catalog
entries with `simulated = true`) and for the offline `frugalflow demo`.
"""

from .fake_json import fake_json
from .simulator import Fault, SimulatedChatModel, Simulator, simulator

__all__ = ["Fault", "SimulatedChatModel", "Simulator", "fake_json", "simulator"]
