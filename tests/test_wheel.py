"""The installed wheel works outside the repository: the demo, the README quickstart, the
ready-made flows by name and the tools; and the CLI finds installed flows unless ./flows has them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest

from frugalflow.cli import installed_flow_names, load_all_flows, load_flow
from frugalflow.exceptions import FrugalflowError

ROOT = Path(__file__).resolve().parents[1]
_PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
# What a wheel build reads: the packages, their mapped folders and the readme.
_SOURCES = ["pyproject.toml", "README.md", "frugalflow", "flows", "agents", "tools", "examples/data"]


def quickstart_code() -> str:
    """The first python block under README's "## Quickstart" heading."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README's Quickstart has no python block"
    return match.group(1)


def test_every_package_folder_is_listed_for_the_wheel() -> None:
    """pyproject.toml lists packages by hand (the prefixed names need it): a new subpackage
    of frugalflow that is not listed would be missing from the wheel."""
    on_disk = {".".join(p.parent.relative_to(ROOT).parts)
               for p in (ROOT / "frugalflow").rglob("*.py") if "__pycache__" not in p.parts}
    on_disk |= {".".join(p.parent.relative_to(ROOT).parts)
                for p in (ROOT / "frugalflow").rglob("*.toml")}
    assert on_disk <= set(_PYPROJECT["packages"])
    mapped = _PYPROJECT["package-dir"]
    for name in ("frugalflow_flows", "frugalflow_agents", "frugalflow_tools", "frugalflow_flows.kb"):
        assert name in _PYPROJECT["packages"] and (ROOT / mapped[name]).is_dir()


def _fake_install(root: Path, names: dict[str, str]) -> Path:
    site = root / "site"
    (site / "frugalflow_flows").mkdir(parents=True)
    (site / "frugalflow_flows" / "__init__.py").write_text('"""installed"""\n')
    for name, flow_name in names.items():
        (site / "frugalflow_flows" / f"{name}.py").write_text(
            '"""a flow"""\nfrom typing import TypedDict\nfrom frugalflow import END, START, Flow\n'
            "class S(TypedDict, total=False):\n    x: str\n"
            f"flow = Flow({flow_name!r}, S)\n"
            "@flow.node()\nasync def step(state: S) -> S:\n    return {}\n"
            'flow.add_edge(START, "step")\nflow.add_edge("step", END)\n')
    return site


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory outside the repository with frugalflow_flows importable (as if installed)."""
    site = _fake_install(tmp_path, {"packaged": "packaged", "shadowed": "installed_copy"})
    monkeypatch.syspath_prepend(str(site))
    for name in [m for m in sys.modules if m.startswith("frugalflow_flows")]:
        monkeypatch.delitem(sys.modules, name)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def test_installed_flows_load_by_name_outside_the_repository(installed: Path) -> None:
    assert installed_flow_names() == ["packaged", "shadowed"]
    assert load_flow("packaged").name == "packaged"
    assert sorted(f.name for f in load_all_flows()) == ["installed_copy", "packaged"]
    with pytest.raises(FrugalflowError, match="flows: packaged, shadowed"):
        load_flow("nope")


def test_a_flows_folder_here_comes_before_the_installed_flows(installed: Path) -> None:
    (installed / "flows").mkdir()
    shutil.copy(installed.parent / "site" / "frugalflow_flows" / "packaged.py",
                installed / "flows" / "shadowed.py")
    assert load_flow("shadowed").name == "packaged"      # the local file, not the installed one
    assert load_flow("packaged").name == "packaged"      # still found among the installed ones
    assert [f.name for f in load_all_flows()] == ["packaged"]   # the folder here, as before
    with pytest.raises(FrugalflowError, match="no flow folder 'missing'"):
        load_all_flows("missing")


# --- the real wheel in a fresh virtual environment -------------------------------------------


def _build_wheel(tmp: Path) -> Path:
    src = tmp / "src"
    for rel in _SOURCES:
        if (ROOT / rel).is_dir():
            shutil.copytree(ROOT / rel, src / rel,
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.db"))
        else:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / rel, src / rel)
    import setuptools

    # The dev extra asks for setuptools >= 77 (it reads `license = "Apache-2.0"`), so the wheel
    # builds offline, without an isolated build that would fetch its backend.
    assert int(setuptools.__version__.split(".")[0]) >= 77, (
        f"setuptools {setuptools.__version__} here: `make install` (the dev extra) brings 77+")
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
           "-w", str(tmp / "dist"), str(src)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return next((tmp / "dist").glob("frugalflow-*.whl"))


def _fresh_venv(tmp: Path, wheel: Path) -> Path:
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q",
                    "--no-deps", "--no-index", str(wheel)], check=True, timeout=300, env=clean)
    # Dependencies come from this environment's site-packages, offline, *after* the new venv's
    # own; a bare path in a .pth runs none of that folder's .pth files, so the repository's
    # editable install cannot leak in (checked below all the same).
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    (purelib / "zz_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_the_wheel_runs_the_demo_quickstart_and_flows_from_any_directory(tmp_path: Path) -> None:
    venv = _fresh_venv(tmp_path, _build_wheel(tmp_path))
    work = tmp_path / "elsewhere"
    work.mkdir()
    (work / "quickstart.py").write_text(quickstart_code())
    env = {"PATH": f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path),
           "LANG": "C.UTF-8", "COLUMNS": "200"}     # no PYTHONPATH, no provider keys

    def run(*args: str) -> str:
        done = subprocess.run(list(args), cwd=work, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
        return done.stdout

    python = str(venv / "bin" / "python")
    where = run(python, "-c", "import frugalflow, frugalflow_flows, frugalflow_tools as t; "
                "print(frugalflow.__file__); print(frugalflow_flows.__file__); print(t.__file__)")
    for line in where.split():
        assert Path(line).resolve().is_relative_to(venv.resolve()), where

    run(str(venv / "bin" / "frugalflow"), "demo")
    out = run(python, "quickstart.py")
    assert "'reply':" in out
    explained = run(str(venv / "bin" / "frugalflow"), "explain", "support_triage")
    assert "classify" in explained
    assert "plan" in run(str(venv / "bin" / "frugalflow"), "explain", "research_brief")
    # the tools, and research_brief's documents shipped as package data
    tools = run(python, "-c",
                "from frugalflow_tools import calculator, make_document_search\n"
                "from frugalflow_flows.research_brief import KB\n"
                "print(calculator.invoke({'expression': '6 * 7'}))\n"
                "print(KB)\n"
                "print(make_document_search(KB).invoke({'query': 'fallback breaker'}))\n")
    assert tools.splitlines()[0] == "42"
    assert "frugalflow_flows/kb" in tools.splitlines()[1] and ".md]" in tools
