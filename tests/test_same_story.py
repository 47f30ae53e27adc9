"""One run with a fallback tells the same story everywhere: the ledger, the LangChain callback
tree, the OpenTelemetry spans, the event stream and the run page.

The run goes through the real service (create_app over httpx), the real OpenAI and Anthropic
clients talk HTTP to the local emulator, and OpenAI answers 429: the node falls back to
Anthropic. Each view must name the same two attempts, in the same order, with the same
outcome, error class and model.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import httpx
import pytest
from langchain_core.tracers.schemas import Run
from opentelemetry.sdk.trace import ReadableSpan

from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner
from frugalflow.service import create_app
from frugalflow.testing.emulator import EMULATOR_KEY_ENV, ProviderEmulator, emulated_catalog
from test_callbacks import Recorder, meta, walk
from test_otel import (  # noqa: F401 - _clients and otel are fixtures
    SECRET,
    Tracing,
    _clients,
    one_node_flow,
    otel,
)

pytestmark = pytest.mark.usefixtures("_clients")


def _attempt_runs(recorder: Recorder) -> list[Run]:
    """The attempt child runs under the routed call, in the order they started."""
    runs = [r for root in recorder.roots for r in walk(root)
            if r.run_type == "llm" and meta(r).get("frugalflow_try") is not None]
    return sorted(runs, key=lambda r: r.start_time)


def _chat_spans(otel: Tracing) -> list[ReadableSpan]:
    return sorted((s for s in otel.finished() if s.name.startswith("chat ")),
                  key=lambda s: s.start_time or 0)


def _events(body: str) -> list[dict[str, object]]:
    return [json.loads(line[len("data: "):]) for line in body.splitlines()
            if line.startswith("data: ")]


async def test_a_fallback_reads_the_same_in_every_view(
        tmp_path: Path, otel: Tracing, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(EMULATOR_KEY_ENV, SECRET)
    recorder = Recorder()
    async with ProviderEmulator(seed=5) as emu:
        catalog = emulated_catalog(emu, ("openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"))
        emu.fault("openai", "rate_limit", retry_after=None)  # 429 without Retry-After: next
        runner = Runner(f"sqlite:///{tmp_path / 'runs.db'}", flows=[one_node_flow()],
                        catalog=catalog, breakers=BreakerRegistry(threshold=1),
                        callbacks=[recorder], tracer_provider=otel.tracer_provider,
                        meter_provider=otel.meter_provider)
        app = create_app(runner)
        try:
            async with app.router.lifespan_context(app), httpx.AsyncClient(
                    transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
                started = await c.post("/runs", json={"flow": "ask", "wait": True,
                                                      "input": {"topic": "circuit breakers"}})
                assert started.status_code == 200, started.text
                run_id = started.json()["run_id"]
                assert started.json()["status"] == "succeeded"
                detail = (await c.get(f"/runs/{run_id}")).json()
                stream = (await c.get(f"/runs/{run_id}/events")).text
                page = (await c.get(f"/ui/runs/{run_id}")).text
        finally:
            await runner.close()
            await catalog.aclose()

    # the ledger (and the API's view of it)
    ledger = [(a["model"], a["outcome"], a["error_class"]) for a in detail["calls"]]
    assert ledger == [("openai/gpt-4o-mini", "error", "rate_limit"),
                      ("anthropic/claude-haiku-4-5", "ok", None)]
    cost = detail["calls"][1]["cost_usd"]
    assert cost > 0

    # the LangChain callback tree: two attempt runs under the routed call
    runs = _attempt_runs(recorder)
    assert [meta(r)["ls_model_name"] for r in runs] == ["gpt-4o-mini", "claude-haiku-4-5"]
    assert [meta(r)["frugalflow_model"] for r in runs] == [m for m, _, _ in ledger]
    assert runs[0].error is not None and "RateLimitError" in runs[0].error
    assert runs[1].error is None
    assert runs[0].parent_run_id == runs[1].parent_run_id  # both children of the routed call
    assert recorder.roots[0].id.hex == run_id.replace("-", "")  # the graph's root is the run

    # the OpenTelemetry spans
    spans = _chat_spans(otel)
    assert [s.attributes["gen_ai.request.model"] for s in spans if s.attributes] == [
        "gpt-4o-mini", "claude-haiku-4-5"]
    assert [(s.attributes or {}).get("error.type") for s in spans] == ["rate_limit", None]
    assert (spans[1].attributes or {})["frugalflow.cost_usd"] == pytest.approx(cost)
    assert (spans[1].attributes or {})["frugalflow.fallback_from"] == "openai/gpt-4o-mini"

    # the event stream, replayed from the event log after the run ended
    attempts = [e for e in _events(stream) if e["event"] == "attempt"]
    assert [(e["model"], e["outcome"], e["error_class"]) for e in attempts] == ledger
    ids = [e["id"] for e in _events(stream) if e.get("id") is not None]
    assert ids == sorted(ids) and len(ids) == len(set(ids))

    # the run page: both attempts, the fallback and its reason
    text = html.unescape(re.sub(r"<[^>]+>", " ", page))
    first, second = text.find("openai/gpt-4o-mini"), text.find("anthropic/claude-haiku-4-5")
    assert 0 <= first and 0 <= second
    assert "fell back" in text and "rate_limit" in text

    # and no secret anywhere
    everything = json.dumps(detail) + stream + page + json.dumps(
        [r.model_dump() for r in runs], default=str) + json.dumps(
        [dict(s.attributes or {}) for s in otel.finished()])
    assert SECRET not in everything
