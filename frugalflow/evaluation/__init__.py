"""Evaluation: how well each model does a node's work on your own data, and what that is worth."""

from .frontier import Interval, Measured, Policy, cheapest_policy, frontier, lower_hull, wilson

__all__ = ["Interval", "Measured", "Policy", "cheapest_policy", "frontier", "lower_hull", "wilson"]
