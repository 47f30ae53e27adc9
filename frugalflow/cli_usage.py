"""How the command line reports bad usage: one line per bad option value, flags shown as flags."""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from typer._click.core import Context as ClickContext
from typer._click.exceptions import (BadParameter, MissingParameter, NoArgsIsHelpError,
                                     UsageError)
from typer.core import TyperGroup, TyperOption

__all__ = ["OneLineErrorsGroup", "OneLineUsageErrors", "err_console"]

err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 160)


def _flag_aware_type(self: TyperOption, ctx: ClickContext) -> str | None:
    """A boolean flag's help shows `--json`, not `--json <bool>` (typer labels every
    option with its type, flags included; `--help`'s option is built lazily per command,
    hence here rather than per declared option)."""
    return None if self.is_flag else _typer_display_type(self, ctx)


_typer_display_type = TyperOption.display_type_rich
TyperOption.display_type_rich = _flag_aware_type  # type: ignore[method-assign]


def _usage_line(e: UsageError, argv: list[str]) -> str:
    """A bad option or argument in one line: which, what was wrong, and an example."""
    param = e.param if isinstance(e, BadParameter) else None
    if param is None or isinstance(e, MissingParameter):
        text = " ".join(e.format_message().split())
        where = e.ctx.command_path if e.ctx else "frugalflow"
        return f"{text} (see `{where} --help`)"
    name = (next((o for o in param.opts if o.startswith("--")), param.opts[0])
            if isinstance(param, TyperOption) else param.display_name_raw)
    value = _value_given(name, argv)
    envvar = getattr(param, "envvar", None)
    if value is None and isinstance(envvar, str) and os.environ.get(envvar):
        value, name = os.environ[envvar], envvar  # the bad value came from the environment
    kind = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    if kind in (float, int) and value is not None and "valid" in e.message:
        what, example = ("a number", "0.05") if kind is float else ("a whole number", "10")
        return f"{name}: {value!r} is not {what} (e.g. {name} {example})"
    shown = f" (got {value!r})" if value is not None else ""
    return f"{name}: {' '.join(e.message.split())}{shown}"


def _value_given(name: str, argv: list[str]) -> str | None:
    """The value written after option `name` (`--x v` or `--x=v`) in the command line."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


class OneLineErrorsGroup(TyperGroup):
    """The root command: every bad option value in one line (not click's usage box)."""

    _argv: list[str] = []

    def make_context(self, info_name: str | None, args: list[str],
                     parent: ClickContext | None = None, **extra: Any) -> ClickContext:
        self._argv = list(args)
        with OneLineUsageErrors(self._argv):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: ClickContext) -> Any:
        with OneLineUsageErrors(self._argv):
            return super().invoke(ctx)


class OneLineUsageErrors:
    """Turns a usage error into `error: <one line>` on stderr, exit 2 (a bare command
    asking for help is left to typer)."""

    def __init__(self, argv: list[str]) -> None:
        self.argv = argv

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 _tb: object) -> Literal[False]:
        if not isinstance(error, UsageError) or isinstance(
                error, NoArgsIsHelpError):
            return False
        err_console.print(f"[red]error:[/] {escape(_usage_line(error, self.argv))}",
                          soft_wrap=True)
        raise typer.Exit(2)
