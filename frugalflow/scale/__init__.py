"""Running frugalflow as a fleet: work dispatched to workers, state shared through Redis."""
