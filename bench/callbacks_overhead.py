"""What LangChain callbacks cost a routed call: N simulated calls without a handler, with a
no-op handler and with a run-recording tracer (each attempt then is a child run).

    python bench/callbacks_overhead.py            # 2000 calls, 5 repeats, modes interleaved
    python bench/callbacks_overhead.py --calls 500 --repeats 3

Prints seconds per N calls for each repeat, then min / median / max and microseconds per
call. Without a handler no child callback manager is built (see
frugalflow.tracing.callbacks): compare `none` with the same script on an older checkout.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import HumanMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tracers.base import AsyncBaseTracer
from langchain_core.tracers.schemas import Run

from frugalflow import Catalog, FallbackPolicy, ModelSpec, RoutedChatModel, RunContext, RunUsage

MODES = ("none", "noop", "tracer")


class _Noop(AsyncCallbackHandler):
    """Listens to everything, does nothing."""


class _Tracer(AsyncBaseTracer):
    """Builds every run tree (as LangSmith's tracer does), keeps nothing."""

    async def _persist_run(self, run: Run) -> None:
        return None


def _catalog() -> Catalog:
    def spec(provider: str, model: str, price: float) -> ModelSpec:
        return ModelSpec(provider=provider, model=model, simulated=True, input_price=price,
                         output_price=price, context_window=100_000,
                         capabilities={"tool_calling": True, "structured_output": True},
                         quality={"writing": 0.8})

    return Catalog([spec("sim-a", "small", 0.1), spec("sim-b", "medium", 1.0)], name="bench")


async def _timed(mode: str, calls: int) -> float:
    ctx = RunContext(catalog=_catalog(), policy=FallbackPolicy(),
                     usage=RunUsage(max_attempts=100))
    model = RoutedChatModel(context=ctx, node="n")
    messages = [HumanMessage("hello there")]
    config: RunnableConfig | None = None
    if mode != "none":
        config = {"callbacks": [_Noop() if mode == "noop" else _Tracer()]}
    for _ in range(50):  # warm-up: built models, ranking caches
        await model.ainvoke(messages, config=config)
    t0 = time.perf_counter()
    for _ in range(calls):
        await model.ainvoke(messages, config=config)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    seconds: dict[str, list[float]] = {m: [] for m in MODES}
    for _ in range(args.repeats):
        for mode in MODES:  # interleaved: a busy moment of the machine hits every mode
            seconds[mode].append(asyncio.run(_timed(mode, args.calls)))
    for mode, runs in seconds.items():
        med = statistics.median(runs)
        print(f"{mode:7s} {' '.join(f'{s:.3f}' for s in runs)}  min {min(runs):.3f} "
              f"median {med:.3f} max {max(runs):.3f} s  ({med / args.calls * 1e6:.0f} us/call)")


if __name__ == "__main__":
    main()
