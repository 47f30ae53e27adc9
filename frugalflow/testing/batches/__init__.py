"""The provider emulator's batch APIs: one module per wire format on a shared `BatchDesk`."""

from .desk import BatchDesk, BatchScript, EmulatedBatch, ItemOutcome

__all__ = ["BatchDesk", "BatchScript", "EmulatedBatch", "ItemOutcome"]
