"""Executes the example notebooks in place (`make notebooks`), so the committed copies carry
their outputs and a reader on GitHub sees the tables and charts without running anything.

    python examples/execute.py                      # every notebook
    python examples/execute.py 06_evaluate_a_new_model.ipynb

Each executed notebook records a hash of its code cells (`metadata.frugalflow.source_sha256`):
tests/test_notebooks.py compares it with the cells as committed, so a cell edited without
re-executing the notebook is caught. Outputs holding an absolute path of this machine (a
temporary directory, the checkout, the home directory) are refused: they churn on every run and
say nothing to a reader.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbformat import NotebookNode

EXAMPLES = Path(__file__).resolve().parent
ROOT = EXAMPLES.parent


def source_hash(nb: NotebookNode) -> str:
    """The hash of the notebook's code cells, in order (markdown edits need no re-execution)."""
    digest = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            digest.update(cell.source.encode())
            digest.update(b"\0")
    return digest.hexdigest()


def output_text(output: NotebookNode) -> str:
    """Everything textual an output shows (stream text, plain/html data, an error's trace)."""
    parts = [str(output.get("text", ""))]
    for mime, value in output.get("data", {}).items():
        if not mime.startswith("image/"):
            parts.append(value if isinstance(value, str) else "".join(value))
    parts += output.get("traceback", [])
    return "\n".join(parts)


def machine_paths(nb: NotebookNode) -> list[str]:
    """Absolute paths of this machine that an output shows (each once)."""
    roots = {str(Path(tempfile.gettempdir()).resolve()), tempfile.gettempdir(), str(ROOT),
             str(Path.home())}
    roots.discard("/")
    text = "\n".join(output_text(o) for c in nb.cells if c.cell_type == "code"
                     for o in c.get("outputs", []))
    return sorted(r for r in roots if r + "/" in text or r + "\\" in text)


def tidy(nb: NotebookNode) -> None:
    """Drops what churns on every run without telling a reader anything."""
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        cell.metadata.pop("execution", None)  # per-cell timestamps
    nb.metadata["frugalflow"] = {"source_sha256": source_hash(nb)}


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    leaked = machine_paths(nb)
    if leaked:
        raise SystemExit(f"{path.name}: an output shows the local path {leaked[0]}; print a "
                         "relative path or a name instead (not written)")
    tidy(nb)
    nbformat.write(nb, path)
    print(f"executed {path.name}")


def main(names: list[str]) -> None:
    paths = [EXAMPLES / n for n in names] if names else sorted(EXAMPLES.glob("*.ipynb"))
    for path in paths:
        execute(path)


if __name__ == "__main__":
    main(sys.argv[1:])
