"""Reusable agents: instructions, needs, tools and output schema, composed by flows."""

from .research import critic, planner, researcher, synthesizer
from .support import drafter, extractor, reviewer, triager

__all__ = ["critic", "drafter", "extractor", "planner", "researcher", "reviewer",
           "synthesizer", "triager"]
