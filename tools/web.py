"""A web search tool: it needs the internet and a search service, so offline it says so."""

from __future__ import annotations

import os

from langchain_core.tools import ToolException, tool


@tool
def web_search(query: str) -> str:
    """Search the web (needs internet access and FRUGALFLOW_SEARCH_URL; offline it errors)."""
    if not os.environ.get("FRUGALFLOW_SEARCH_URL"):
        raise ToolException(
            "web_search needs internet access and a search service (set FRUGALFLOW_SEARCH_URL); "
            "none is configured here, so use search_documents over local files instead"
        )
    raise ToolException("web_search: calling a search service is not implemented in this build")


web_search.handle_tool_error = True
