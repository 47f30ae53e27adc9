"""Options shared by several commands, and the settings they make (the model-call timeout)."""

from __future__ import annotations

import os
import re

import typer

from .exceptions import FrugalflowError
from .resilience import FallbackPolicy

__all__ = ["CatalogOption", "DbOption", "DeadlineOption", "JsonOption", "PolicyOption",
           "RouterOption", "TimeoutOption", "duration_seconds", "fallback_policy",
           "timeout_seconds"]

DbOption = typer.Option(None, "--db", help="Database URL (default: FRUGALFLOW_DATABASE_URL or sqlite:///frugalflow.db).")
JsonOption = typer.Option(False, "--json", help="Machine-readable output.")
CatalogOption = typer.Option(None, "--catalog", help="Catalog file (default: FRUGALFLOW_CATALOG, else built-in).")
RouterOption = typer.Option(None, "--router", envvar="FRUGALFLOW_ROUTER",
                            help="Route nodes that ask for it (Needs target/price_weight/cascade) "
                                 "with this stored router's newest version (see `frugalflow router`).")
PolicyOption = typer.Option(None, "--policy", envvar="FRUGALFLOW_POLICY",
                            help="Route on this stored node policy's newest version (its measured "
                                 "pass rates and choices; see `frugalflow policy list`).")

TimeoutOption = typer.Option(None, "--timeout", min=0.001, envvar="FRUGALFLOW_TIMEOUT",
                             help="Seconds one model call (one attempt) may take before it "
                                  "counts as a timeout and falls back (default 60).")


DeadlineOption = typer.Option(None, "--deadline",
                              help="The run's default deadline (e.g. 20m, 6h, 1h30m, 1d), as "
                                   "`frugalflow run --deadline` gives it: nodes without their "
                                   "own Needs.deadline may wait this long (batch, flex and "
                                   "off-peak tiers that can meet it); a node's own deadline "
                                   "wins, as at run time.")

RunDeadlineOption = typer.Option(None, "--deadline",
                                 help="The run's default deadline (e.g. 20m, 6h, 1h30m, 1d): "
                                      "nodes without their own Needs.deadline may wait this "
                                      "long for a cheaper tier (batch, flex, off-peak).")

_DURATION = re.compile(r"(\d+(?:\.\d+)?)([dhms])")
_UNIT_S = {"d": 86400, "h": 3600, "m": 60, "s": 1}


def duration_seconds(text: str) -> float:
    """`6h`, `20m`, `1h30m`, `1d`, `90s` or plain seconds (`3600`) as seconds; a bad value
    is a typer.BadParameter (one line, with an example)."""
    value = text.strip().lower()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION.findall(value)
        seconds = (sum(float(n) * _UNIT_S[u] for n, u in parts)
                   if parts and "".join(n + u for n, u in parts) == value else float("nan"))
    if not seconds > 0 or seconds == float("inf"):
        raise typer.BadParameter(f"{text!r} is not a duration above 0 (e.g. 6h, 20m, 1h30m)",
                                 param_hint="--deadline")
    return seconds


def timeout_seconds(timeout: float | None) -> float | None:
    """--timeout, else FRUGALFLOW_TIMEOUT (also for commands without the option), else None
    (FallbackPolicy's default)."""
    if timeout is not None:
        return timeout
    text = os.environ.get("FRUGALFLOW_TIMEOUT", "").strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise FrugalflowError(f"FRUGALFLOW_TIMEOUT: {text!r} is not a number of seconds "
                              "above 0 (e.g. FRUGALFLOW_TIMEOUT=20)")
    return value


def fallback_policy(timeout: float | None) -> FallbackPolicy | None:
    """The retry/timeout policy of the runs a command starts (None: the default one)."""
    seconds = timeout_seconds(timeout)
    return FallbackPolicy(timeout=seconds) if seconds is not None else None
