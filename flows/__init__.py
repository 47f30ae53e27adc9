"""Ready-made workflow definitions. Each module exposes `flow` (a frugalflow Flow)."""
