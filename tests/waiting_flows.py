"""What the waiting-run tests share with their child processes (tests/batch_poller_child.py,
tests/waiting_worker.py): the ready-made nightly enrichment flow, named `nightly`, and the
two models whose batches the emulator serves."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flows/, from a child process

from flows.nightly_enrichment import nightly as _nightly  # noqa: E402

MODELS = ("openai/gpt-4o-mini", "anthropic/claude-haiku-4-5")

nightly = functools.partial(_nightly, name="nightly")
