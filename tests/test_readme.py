"""The README's Python examples run as written (on the simulated catalog: no keys here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(capsys) -> None:  # type: ignore[no-untyped-def]
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    for block in blocks:
        exec(compile(block, str(README), "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    assert "'reply':" in out and "classify" in out


def _cli_mentions() -> list[str]:
    """Every `frugalflow ...` command the README shows: lines of its shell blocks, and the
    inline code spans that start with `frugalflow ` (the CLI table, the prose)."""
    text = README.read_text()
    lines: list[str] = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        joined = block.replace("\\\n", " ")
        lines += [line.split("#")[0].strip() for line in joined.splitlines()]
    lines += re.findall(r"`(frugalflow [^`]+)`", text)
    return [line for line in lines if line.startswith("frugalflow ")]


def test_every_cli_command_and_option_in_the_readme_exists() -> None:
    import typer.main

    from frugalflow.cli import app

    root: Any = typer.main.get_command(app)  # typer's own click: groups have `commands`
    mentions = _cli_mentions()
    assert len(mentions) > 20
    problems: list[str] = []
    for line in mentions:
        words = line.split()[1:]
        command = root
        path = ["frugalflow"]
        while hasattr(command, "commands") and words and words[0] in command.commands:
            path.append(words[0])
            command = command.commands[words.pop(0)]
        if hasattr(command, "commands") and words and words[0][0].isalpha():
            problems.append(f"{line!r}: no command {words[0]!r} under {' '.join(path)}")
            continue
        known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
        known |= {"--help"}
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", " ".join(words)):
            if option not in known:
                problems.append(f"{line!r}: {' '.join(path)} has no option {option}")
    assert not problems, "\n".join(problems)


def test_the_configuration_table_names_every_variable_frugalflow_reads() -> None:
    root = README.parent
    read = set()
    for folder in ("frugalflow", "flows"):
        for path in (root / folder).rglob("*.py"):
            read |= set(re.findall(r"FRUGALFLOW_[A-Z_]+", path.read_text()))
    read -= {"FRUGALFLOW_EMULATOR_KEY"}  # the test emulator's own (frugalflow.testing)
    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"FRUGALFLOW_[A-Z_]+", section))
    assert read <= documented, f"not in the configuration table: {sorted(read - documented)}"
