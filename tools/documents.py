"""Search over local documents (text and markdown files in a folder), offline."""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

from langchain_core.tools import BaseTool, ToolException, tool

_WORD = re.compile(r"[a-z0-9]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class DocumentIndex:
    """Paragraph-level BM25 over the .txt/.md files of a folder (loaded once)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ToolException(f"document folder {str(self.folder)!r} does not exist")
        self.passages: list[tuple[str, str]] = []
        for path in sorted(self.folder.rglob("*")):
            if path.suffix in (".txt", ".md") and path.is_file():
                heading = ""
                for para in re.split(r"\n\s*\n", path.read_text(errors="replace")):
                    para = para.strip()
                    if para.startswith("#") and "\n" not in para:
                        heading = para.lstrip("# ")  # a heading joins the passage under it
                        continue
                    if para:
                        text = f"{heading}: {para}" if heading else para
                        self.passages.append((path.name, text))
        self._tf = [Counter(_words(p)) for _, p in self.passages]
        self._len = [sum(c.values()) for c in self._tf]
        self._avg = sum(self._len) / len(self._len) if self._len else 0.0
        df: Counter[str] = Counter()
        for c in self._tf:
            df.update(c.keys())
        n = len(self.passages)
        self._idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}

    def search(self, query: str, k: int = 3) -> list[tuple[float, str, str]]:
        terms = _words(query)
        scored = []
        for i, tf in enumerate(self._tf):
            score = 0.0
            for t in terms:
                f = tf.get(t, 0)
                if f:
                    norm = 1.2 * (0.25 + 0.75 * self._len[i] / (self._avg or 1))
                    score += self._idf.get(t, 0.0) * f * 2.2 / (f + norm)
            if score > 0:
                scored.append((score, *self.passages[i]))
        return sorted(scored, key=lambda s: -s[0])[:k]


def make_document_search(folder: str | Path, *, k: int = 3) -> BaseTool:
    """A `search_documents(query)` tool over the documents in `folder`."""
    index = DocumentIndex(folder)

    @tool
    def search_documents(query: str) -> str:
        """Search the local knowledge base; returns the most relevant passages with their file."""
        hits = index.search(query, k)
        if not hits:
            return "no matching passage"
        return "\n\n".join(f"[{name}] {text}" for _, name, text in hits)

    search_documents.handle_tool_error = True
    return search_documents
