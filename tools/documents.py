"""Search over local documents (text and markdown files in a folder), offline.

Only regular files inside the folder are read: a symlink (to a file or a directory) whose
target lies outside the folder is skipped, so is anything larger than `max_file_bytes` (never
read, only stat'ed) and whatever exceeds `max_total_bytes`. Skipped files are listed in
`DocumentIndex.skipped` and logged once.
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
from collections import Counter
from pathlib import Path

from langchain_core.tools import BaseTool, ToolException, tool

_WORD = re.compile(r"[a-z0-9]+")
_SUFFIXES = (".txt", ".md")
MAX_QUERY_CHARS = 2000
_MAX_TERMS = 64  # distinct query words scored (scoring is passages x terms)
log = logging.getLogger("frugalflow")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _read_bounded(path: Path, limit: int, expect: os.stat_result) -> str | None:
    """The text of the regular file `expect` describes, if at most `limit` bytes, else None.

    The last component is opened without following a symlink and without blocking (a FIFO
    or device), and the opened file must be the one checked during the walk (same device and
    inode), so a path swapped for a symlink after the check is not read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if (not stat.S_ISREG(st.st_mode) or st.st_size > limit
                or (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino)):
            return None
        data = f.read(limit + 1)  # a file that grew since fstat is still read only this far
    return None if len(data) > limit else data.decode("utf-8", errors="replace")


class DocumentIndex:
    """Paragraph-level BM25 over the .txt/.md files of a folder (loaded once)."""

    def __init__(self, folder: str | Path, *, max_file_bytes: int = 2_000_000,
                 max_total_bytes: int = 50_000_000) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ToolException(f"document folder {str(self.folder)!r} does not exist")
        self.root = self.folder.resolve(strict=True)
        if ".." in self.folder.parts and self.root != Path(os.path.normpath(self.folder)).resolve():
            # 'kb/link/..' is not 'kb' when link is a symlink: refuse the surprise
            raise ToolException(f"document folder {str(self.folder)!r} leaves through a symlink "
                                "and '..'; give the folder's real path")
        self.passages: list[tuple[str, str]] = []
        self.skipped: list[tuple[str, str]] = []  # (path relative to the folder, why)
        total = 0
        for path, real in self._files():
            try:
                st = real.stat()
            except OSError:
                self._skip(path, "vanished while indexed")
                continue
            if not stat.S_ISREG(st.st_mode):
                self._skip(path, "not a regular file")
                continue
            if st.st_size > max_file_bytes:
                self._skip(path, f"larger than {max_file_bytes:,} bytes ({st.st_size:,})")
                continue
            if total + st.st_size > max_total_bytes:
                self._skip(path, f"over the folder's total of {max_total_bytes:,} bytes")
                continue
            text = _read_bounded(real, max_file_bytes, st)
            if text is None:
                self._skip(path, "changed while indexed")
                continue
            total += st.st_size
            self._add(path.name, text)
        self._tf = [Counter(_words(p)) for _, p in self.passages]
        self._len = [sum(c.values()) for c in self._tf]
        self._avg = sum(self._len) / len(self._len) if self._len else 0.0
        df: Counter[str] = Counter()
        for c in self._tf:
            df.update(c.keys())
        n = len(self.passages)
        self._idf = {w: math.log(1 + (n - d + 0.5) / (d + 0.5)) for w, d in df.items()}
        if self.skipped:
            log.warning("document search over %s skipped %d file(s): %s", self.folder,
                        len(self.skipped),
                        "; ".join(f"{p} ({why})" for p, why in self.skipped[:10]))

    def _add(self, name: str, text: str) -> None:
        heading = ""
        for para in re.split(r"\n\s*\n", text):
            para = para.strip()
            if para.startswith("#") and "\n" not in para:
                heading = para.lstrip("# ")  # a heading joins the passage under it
                continue
            if para:
                self.passages.append((name, f"{heading}: {para}" if heading else para))

    def _files(self) -> list[tuple[Path, Path]]:
        """(path, resolved path) of the candidate files under the real root, sorted.

        Directories are walked without following symlinks; a symlinked file is taken only when
        its resolved target lies inside the root, and a symlinked directory is never entered
        (if its target is inside the root, the walk reaches it anyway)."""
        found: dict[Path, Path] = {}
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            here = Path(dirpath)
            for name in dirnames:
                if (here / name).is_symlink() and self._resolve_inside(here / name) is None:
                    self._skip(here / name, "a symlink leading outside the folder")
            for name in sorted(filenames):
                path = here / name
                if path.suffix not in _SUFFIXES:
                    continue
                real = self._resolve_inside(path)
                if real is None:
                    self._skip(path, "a symlink leading outside the folder, or dangling")
                    continue
                if real not in found or found[real].is_symlink():
                    found[real] = path  # a file and links to it are read once, as the file
        return sorted(((path, real) for real, path in found.items()), key=lambda pr: pr[0])

    def _resolve_inside(self, path: Path) -> Path | None:
        """The real path, when it exists and lies inside the root (`..` and links resolved)."""
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling link or a symlink loop
            return None
        return real if real.is_relative_to(self.root) else None

    def _skip(self, path: Path, why: str) -> None:
        self.skipped.append((str(path.relative_to(self.root)), why))

    def search(self, query: str, k: int = 3) -> list[tuple[float, str, str]]:
        if len(query) > MAX_QUERY_CHARS:
            raise ToolException(f"query is too long ({len(query):,} characters; the limit is "
                                f"{MAX_QUERY_CHARS:,})")
        terms = list(dict.fromkeys(_words(query)))[:_MAX_TERMS]
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


def make_document_search(folder: str | Path, *, k: int = 3, max_file_bytes: int = 2_000_000,
                         max_total_bytes: int = 50_000_000) -> BaseTool:
    """A `search_documents(query)` tool over the documents in `folder` (see the module doc)."""
    index = DocumentIndex(folder, max_file_bytes=max_file_bytes, max_total_bytes=max_total_bytes)

    @tool
    def search_documents(query: str) -> str:
        """Search the local knowledge base; returns the most relevant passages with their file."""
        hits = index.search(query, k)
        if not hits:
            return "no matching passage"
        return "\n\n".join(f"[{name}] {text}" for _, name, text in hits)

    search_documents.handle_tool_error = True
    search_documents.handle_validation_error = True
    return search_documents
