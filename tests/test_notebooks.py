"""The notebooks in examples/ run top to bottom (offline, simulated providers) and are committed
with current outputs, plots included, so a reader on GitHub sees them without running anything."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import re
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import nbformat
import pytest
from nbclient import NotebookClient
from nbformat import NotebookNode
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
NOTEBOOKS = sorted(EXAMPLES.glob("*.ipynb"))
IDS = [p.stem for p in NOTEBOOKS]
# Charts each notebook shows (the README names them); a lost one fails even if no cell says plt.
FIGURES = {"02_routing_and_costs": 2, "05_learned_routing": 1, "06_evaluate_a_new_model": 2,
           "07_nodes_that_can_wait": 1}
REEXECUTE = "run `make notebooks` and commit the notebooks"


def _execute_module() -> ModuleType:
    # examples/execute.py is a script, not a package module: load it by path.
    spec = importlib.util.spec_from_file_location("examples_execute", EXAMPLES / "execute.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute_py = _execute_module()


def _code_cells(nb: NotebookNode) -> list[NotebookNode]:
    return [c for c in nb.cells if c.cell_type == "code"]


def _has_png(cell: NotebookNode) -> bool:
    return any("image/png" in o.get("data", {}) for o in cell.get("outputs", []))


def _signature(cell: NotebookNode) -> frozenset[str]:
    """What kinds of output a cell shows (stream names, MIME types, errors), not their values:
    stream splitting, ids and timings vary between runs, the kinds do not."""
    kinds: set[str] = set()
    for o in cell.get("outputs", []):
        if o.output_type == "stream":
            kinds.add(f"stream:{o.name}")
        elif o.output_type == "error":
            kinds.add("error")
        else:
            kinds.update(o.get("data", {}))
    return frozenset(kinds)


def test_there_are_notebooks() -> None:
    assert len(NOTEBOOKS) >= 6
    assert set(FIGURES) <= set(IDS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_a_notebook_is_committed_executed_with_its_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    cells = _code_cells(nb)
    # Executed once, top to bottom, in one kernel: counts 1..n in order.
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1)), REEXECUTE
    assert any(c.outputs for c in cells), REEXECUTE
    errors = [o for c in cells for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} was committed with an error: {errors[0].get('ename')}"
    # A cell edited after the last execution shows outputs of code that is no longer there.
    recorded = nb.metadata.get("frugalflow", {}).get("source_sha256")
    assert recorded == execute_py.source_hash(nb), f"{path.name} changed since it ran: {REEXECUTE}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_a_notebooks_plots_render_inline(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    cells = _code_cells(nb)
    # matplotlib.use("Agg") makes plt.show() display nothing: the plots would be lost.
    assert not [c for c in cells if "matplotlib.use(" in c.source]
    silent = [c.source.splitlines()[0] for c in cells if "plt.show()" in c.source
              and not _has_png(c)]
    assert not silent, f"{path.name}: a cell that shows a plot has no image: {silent[0]!r}"
    assert sum(map(_has_png, cells)) >= FIGURES.get(path.stem, 0)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_a_notebooks_outputs_show_no_local_path_or_secret(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    assert execute_py.machine_paths(nb) == []
    text = "\n".join(execute_py.output_text(o) for c in _code_cells(nb) for o in c.outputs)
    assert "Bearer " not in text and not re.search(r"\bsk-[A-Za-z0-9_-]{8,}", text)
    # Timestamps of each cell's execution churn on every run; execute.py drops them.
    assert not [c for c in nb.cells if "execution" in c.metadata]


def test_the_evaluation_notebook_is_committed_with_its_chart() -> None:
    # A reader on GitHub sees the evaluation's chart without running anything: the committed
    # notebook carries its outputs (`make notebooks` re-executes it).
    nb = nbformat.read(EXAMPLES / "06_evaluate_a_new_model.ipynb", as_version=4)
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 2  # report chart, before/after
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs)
    assert "sim-newco/swift-1" in text and "unscored for extraction" in text


def test_a_local_path_in_an_output_is_found() -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("print(db)")])
    nb.cells[0].outputs = [nbformat.v4.new_output(
        "stream", name="stdout", text=f"sqlite:///{execute_py.ROOT}/x.db\n")]
    # (a checkout under the temp folder shows both: either one is a local path)
    assert str(execute_py.ROOT) in execute_py.machine_paths(nb)


def test_the_source_hash_follows_code_cells_only() -> None:
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# title"),
                                         nbformat.v4.new_code_cell("x = 1")])
    before = execute_py.source_hash(nb)
    nb.cells[0].source = "# another title"
    assert execute_py.source_hash(nb) == before
    nb.cells[1].source = "x = 2"
    assert execute_py.source_hash(nb) != before


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jupyter_client's own
@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_runs_and_its_committed_outputs_are_current(path: Path) -> None:
    committed = nbformat.read(path, as_version=4)
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(EXAMPLES)}})
    client.execute()
    errors = [o for c in _code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors, errors[0].get("traceback") if errors else None
    # Current, tolerantly: each cell shows the same kinds of output as the committed copy (a
    # chart that appeared or vanished, a new warning on stderr, a cell that now prints).
    fresh = [_signature(c) for c in _code_cells(nb)]
    stored = [_signature(c) for c in _code_cells(committed)]
    stale = [(i, sorted(s), sorted(f)) for i, (s, f) in enumerate(zip(stored, fresh)) if s != f]
    assert not stale, f"{path.name} outputs differ from a fresh run (cell, committed, fresh): " \
                      f"{stale}; {REEXECUTE}"


def _extra_closure(extra: str) -> set[str]:
    """Distribution names `pip install 'frugalflow[extra]'` asks for, core ones included."""
    project = tomllib.loads((EXAMPLES.parent / "pyproject.toml").read_text())["project"]
    extras: dict[str, list[str]] = project["optional-dependencies"]
    names: set[str] = set()
    todo, seen = list(project["dependencies"]) + extras[extra], {extra}
    while todo:
        requirement = Requirement(todo.pop())
        if canonicalize_name(requirement.name) == "frugalflow":
            todo += [r for e in requirement.extras - seen for r in extras[e]]
            seen |= requirement.extras
        else:
            names.add(canonicalize_name(requirement.name))
    return names


def test_the_notebooks_extra_installs_what_the_notebooks_import() -> None:
    provided = _extra_closure("notebooks")
    assert {"ipykernel", "nbclient", "nbformat", "matplotlib", "fastapi"} <= provided
    local = {"frugalflow", "flows", "agents", "tools", *sys.stdlib_module_names}
    distributions = importlib.metadata.packages_distributions()
    missing: set[str] = set()
    for path in NOTEBOOKS:
        for cell in _code_cells(nbformat.read(path, as_version=4)):
            code = "\n".join(line for line in cell.source.splitlines()
                             if not line.lstrip().startswith(("%", "!")))
            flags = ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT  # notebooks await
            tree = compile(code, path.name, "exec", flags)
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    modules = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    modules = [node.module]
                else:
                    continue
                for top in {m.split(".")[0] for m in modules} - local:
                    dists = {canonicalize_name(d) for d in distributions.get(top, [top])}
                    if not dists & provided:
                        missing.add(f"{path.stem}: {top}")
    assert not missing, f"add to the `notebooks` extra: {sorted(missing)}"
