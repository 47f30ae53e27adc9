"""Running at scale, the optional extra (`frugalflow[scale]`): workers fed by a task queue, state shared through Redis, run events shared between processes."""
