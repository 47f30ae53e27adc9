"""Executes the example notebooks in place (`make notebooks`), so the committed copies carry
their outputs and a reader on GitHub sees the tables and charts without running anything.

    python examples/execute.py                      # every notebook
    python examples/execute.py 06_evaluate_a_new_model.ipynb
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

EXAMPLES = Path(__file__).resolve().parent


def execute(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(EXAMPLES)}}).execute()
    # Execution counts and kernel ids churn on every run; outputs are what a reader needs.
    nb.metadata.pop("widgets", None)
    nbformat.write(nb, path)
    print(f"executed {path.name}")


def main(names: list[str]) -> None:
    paths = [EXAMPLES / n for n in names] if names else sorted(EXAMPLES.glob("*.ipynb"))
    for path in paths:
        execute(path)


if __name__ == "__main__":
    main(sys.argv[1:])
