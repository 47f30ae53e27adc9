"""Evaluation: how well each model does a node's work on your own data, and what that is worth."""

from .chart import plot_report, save_chart
from .frontier import Interval, Measured, Policy, cheapest_policy, frontier, lower_hull, wilson
from .report import WHOLE_FLOW, ModelStats, NodeReport, Report, build_report
from .savings import NodeSavings, NodeVolume, Savings, Volume, recent_volume, reprice

__all__ = ["WHOLE_FLOW", "Interval", "Measured", "ModelStats", "NodeReport", "NodeSavings",
           "NodeVolume", "Policy", "Report", "Savings", "Volume", "build_report",
           "cheapest_policy", "frontier", "lower_hull", "plot_report", "recent_volume",
           "reprice", "save_chart", "wilson"]
