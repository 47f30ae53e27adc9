"""Scale-out, the optional `scale` extra: worker dispatch, shared Redis state, event relay."""
