"""The ready-made flows as LangGraph graphs, for LangGraph's server and Studio (`langgraph.json`).

`langgraph dev` (from the repository root) loads each attribute named in `langgraph.json`.
Each is the flow's compiled LangGraph graph (`CompiledFlow.graph`): the server attaches its
own checkpointer and store, and every run gets a frugalflow run context built from
configuration, since an assistant cannot pass a Python object:

- catalog: `FRUGALFLOW_CATALOG` (a file), else the built-in catalog when a provider key is
  set, else the simulated one (`Catalog.default()`, read once, when the server loads this);
- budget in USD: the run's `context` (`{"budget": 0.05}`), else its
  `config["configurable"]["budget"]`, else `FRUGALFLOW_BUDGET`; none of them: no limit.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

if importlib.util.find_spec("flows") is None:  # run from a checkout: the flows sit beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flows import document_extraction, research_brief, support_triage  # noqa: E402

support_triage_graph = support_triage.flow.compile().graph
document_extraction_graph = document_extraction.flow.compile().graph
research_brief_graph = research_brief.flow.compile().graph
