"""Evaluation data sets: read cases from JSONL, CSV or pydantic-evals files, write them back, and
check them against a flow's input state before anything is paid.

The file format of record is pydantic-evals' `Dataset` (YAML or JSON: `name`, `cases` of
`name`, `inputs`, `expected_output`, `metadata`), read and written with pydantic-evals' own
loader, so a data set moves between the two tools unchanged. JSONL and CSV are the quick
forms: a JSONL line is a pydantic-evals case or a flat object of inputs; a CSV row is a flat
object whose cells are decoded when they are JSON objects, arrays or numbers.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import difflib
import json
import re
import typing

import typing_extensions
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, TypeAdapter, ValidationError

from ..exceptions import UserError
from .cases import EvalCase, Request

if TYPE_CHECKING:
    from ..flow import Flow

__all__ = ["aload_cases", "asave_cases", "check_cases", "load_cases", "save_cases"]

SUFFIXES = (".jsonl", ".csv", ".yaml", ".yml", ".json")
"""The data set files `load_cases` reads."""

_EXPECTED_KEYS = ("expected", "expected_output")
_CASE_KEYS = frozenset({"id", "name", "inputs", "expected_output", "expected", "metadata",
                        "evaluators"})
_REQUEST_KEY = "frugalflow_request"
"""Where `save_cases` keeps a ledger case's recorded request (in the case's metadata)."""
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][+-]?\d+)?")
_SHOWN = 3  # offending cases named in one error


# -- reading -------------------------------------------------------------------------------


def load_cases(path: str | Path) -> list[EvalCase]:
    """The cases of a data set file: `.jsonl`, `.csv`, or pydantic-evals `.yaml/.yml/.json`.

    A case's id is its `name` (or `id`), else its row: "row-3" is the third case. Raises
    UserError naming the file, the line or row, and the fix, for a missing, empty or
    malformed file and for duplicate ids."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise UserError(f"data set {file}: unknown file type {suffix or '(none)'!r}; use a "
                        f"{', '.join(SUFFIXES)} file")
    try:
        text = file.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserError(f"data set {file} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"data set {file} cannot be read ({type(e).__name__}: {e}); "
                        "give a readable UTF-8 file") from None
    if not text.strip():
        raise UserError(f"data set {file} is empty; add one case per line (JSONL), per row "
                        "(CSV) or under `cases:` (pydantic-evals YAML/JSON)")
    if suffix == ".jsonl":
        cases = _from_jsonl(file, text)
    elif suffix == ".csv":
        cases = _from_csv(file, text)
    else:
        cases = _from_pydantic_evals(file, text, "yaml" if suffix in (".yaml", ".yml") else "json")
    if not cases:
        raise UserError(f"data set {file} has no cases; add at least one")
    _check_unique(file, cases)
    return cases


async def aload_cases(path: str | Path) -> list[EvalCase]:
    """`load_cases` off the event loop (reading and parsing a file is blocking work)."""
    return await asyncio.to_thread(load_cases, path)


def _from_jsonl(file: Path, text: str) -> list[EvalCase]:
    cases: list[EvalCase] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise UserError(f"data set {file}, line {number}: not valid JSON ({e}); write one "
                            "JSON object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"data set {file}, line {number}: a JSON {type(row).__name__}, "
                            "not an object; write one object per line, e.g. "
                            '{"inputs": {...}, "expected_output": ...} or {"field": ...}')
        where = f"data set {file}, line {number}"
        if _case_shaped(row):
            cases.append(_case(where, len(cases) + 1, row.get("name", row.get("id")),
                               row["inputs"], _expected(row), row.get("metadata")))
        else:
            cases.append(_flat_case(where, len(cases) + 1, row))
    return cases


def _case_shaped(row: Mapping[str, Any]) -> bool:
    """A pydantic-evals case ({"inputs": {...}, ...}), not a flat object of inputs (a
    case's keys only: inputs that are not an object are then an error, not a field)."""
    return "inputs" in row and set(row) <= _CASE_KEYS


def _flat_case(where: str, index: int, row: Mapping[str, Any]) -> EvalCase:
    """A flat row: its `id` (else its `name`) names the case, `expected` (or
    `expected_output`) is the answer, the rest are inputs. With an `id`, a `name` is an
    input (a state may have a `name` field)."""
    id_key = "id" if "id" in row else "name"
    inputs = {k: v for k, v in row.items() if k != id_key and k not in _EXPECTED_KEYS}
    return _case(where, index, row.get(id_key), inputs, _expected(row), None)


def _expected(row: Mapping[str, Any]) -> Any:
    for key in _EXPECTED_KEYS:
        if row.get(key) not in (None, ""):
            return row[key]
    return None


def _case(where: str, index: int, name: Any, inputs: Any, expected: Any,
          metadata: Any) -> EvalCase:
    if not isinstance(inputs, Mapping):
        raise UserError(f"{where}: inputs must be an object of input fields, got a "
                        f"{type(inputs).__name__}; write them as {{\"field\": value}}")
    meta = dict(metadata) if isinstance(metadata, Mapping) else (
        {} if metadata is None else {"value": metadata})
    request = _request_of(where, meta.pop(_REQUEST_KEY, None))
    return EvalCase(id=str(name) if name not in (None, "") else f"row-{index}",
                    inputs=dict(inputs), expected=expected, metadata=meta, request=request)


def _request_of(where: str, value: Any) -> Request | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not isinstance(value.get("messages"), list):
        raise UserError(f"{where}: metadata.{_REQUEST_KEY} must be a recorded request "
                        "({\"messages\": [...], \"tools\": [...], \"schema\": ...}); remove it "
                        "or write it back with save_cases")
    return Request(messages=list(value["messages"]), tools=list(value.get("tools") or []),
                   schema=value.get("schema"))


def _from_csv(file: Path, text: str) -> list[EvalCase]:
    reader = csv.DictReader(text.splitlines())
    header = reader.fieldnames or []
    if not header or any(not (h or "").strip() for h in header):
        raise UserError(f"data set {file}: the first row must name every column (input "
                        "fields, optional id/name and expected/expected_output)")
    doubled = sorted({h for h in header if header.count(h) > 1})
    if doubled:
        raise UserError(f"data set {file}: column {doubled[0]!r} appears twice in the header; "
                        "give every column its own name")
    cases: list[EvalCase] = []
    for index, row in enumerate(reader, 1):
        where = f"data set {file}, row {index} (line {reader.line_num})"
        if None in row:
            raise UserError(f"{where}: more cells than the header has columns; quote cells "
                            "that contain commas")
        if any(v is None for v in row.values()):
            raise UserError(f"{where}: fewer cells than the header has columns; give every "
                            "column a cell (an empty one is fine)")
        cells = {k: _cell(v) for k, v in row.items()}
        cases.append(_flat_case(where, index, cells))
    return cases


def _cell(text: str) -> Any:
    """A CSV cell: decoded when it is a JSON object, array or number; else the string."""
    stripped = text.strip()
    if stripped[:1] in ("{", "[") or _NUMBER.fullmatch(stripped):
        try:
            return json.loads(stripped)
        except ValueError:
            return text
    return text


def _from_pydantic_evals(file: Path, text: str, fmt: typing.Literal["yaml", "json"]
                         ) -> list[EvalCase]:
    import yaml
    from pydantic_evals import Dataset

    dataset_type = Dataset[Any, Any, Any]
    try:
        try:
            dataset = dataset_type.from_text(text, fmt=fmt, default_name=file.stem)
        except ExceptionGroup:
            # Evaluators pydantic-evals cannot build here (custom ones): the cases are what
            # an evaluation needs; its scorer is given apart.
            dataset = dataset_type.from_dict(_without_evaluators(_parsed(text, fmt)),
                                             default_name=file.stem)
    except ValidationError as e:
        err = e.errors()[0]
        at = ".".join(str(p) for p in err["loc"])
        raise UserError(f"data set {file}: not a pydantic-evals Dataset file: {at}: "
                        f"{err['msg']}; write `cases:` as a list of {{name, inputs, "
                        "expected_output, metadata}}") from None
    except (ValueError, yaml.YAMLError) as e:  # YAML/JSON syntax, or a duplicate case name
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if first.startswith("Duplicate case name"):
            raise UserError(f"data set {file}: {first}; give every case its own name") from None
        raise UserError(f"data set {file}: cannot be read as a pydantic-evals Dataset "
                        f"({first}); check its {fmt.upper()} syntax") from None
    return [_case(f"data set {file}, case {i}", i, c.name, c.inputs, c.expected_output,
                  c.metadata) for i, c in enumerate(dataset.cases, 1)]


def _parsed(text: str, fmt: str) -> Any:
    import yaml

    return yaml.safe_load(text) if fmt == "yaml" else json.loads(text)


def _without_evaluators(data: Any) -> Any:
    if not isinstance(data, dict):
        return data
    out = {k: v for k, v in data.items() if k not in ("evaluators", "report_evaluators")}
    if isinstance(out.get("cases"), list):
        out["cases"] = [{k: v for k, v in c.items() if k != "evaluators"}
                        if isinstance(c, dict) else c for c in out["cases"]]
    return out


def _check_unique(file: Path, cases: Sequence[EvalCase]) -> None:
    seen: dict[str, int] = {}
    for index, case in enumerate(cases, 1):
        if case.id in seen:
            raise UserError(f"data set {file}: case id {case.id!r} is used by cases "
                            f"{seen[case.id]} and {index}; give every case its own id or name")
        seen[case.id] = index


# -- writing -------------------------------------------------------------------------------


def save_cases(cases: Sequence[EvalCase], path: str | Path) -> None:
    """Write `cases` as a pydantic-evals Dataset file (YAML for .yaml/.yml, JSON for .json),
    which `pydantic_evals.Dataset.from_file` and `load_cases` read back. A case drawn from the
    ledger keeps its recorded request in its metadata."""
    from pydantic_evals import Case, Dataset

    file = Path(path)
    if file.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise UserError(f"save cases to {file}: pydantic-evals files are .yaml, .yml or .json")
    rows: list[Case[Any, Any, Any]] = []
    for case in cases:
        meta = dict(case.metadata)
        if case.request is not None:
            meta[_REQUEST_KEY] = {"messages": case.request.messages,
                                  "tools": case.request.tools, "schema": case.request.schema}
        rows.append(Case(name=case.id, inputs=dict(case.inputs), expected_output=case.expected,
                         metadata=meta or None))
    try:
        Dataset[Any, Any, Any](name=file.stem, cases=rows).to_file(file, schema_path=None)
    except ValueError as e:  # duplicate names
        raise UserError(f"save cases to {file}: {e}; give every case its own id") from None


async def asave_cases(cases: Sequence[EvalCase], path: str | Path) -> None:
    """`save_cases` off the event loop."""
    await asyncio.to_thread(save_cases, cases, path)


# -- checking against a flow ---------------------------------------------------------------


def check_cases(cases: Sequence[EvalCase], flow: Flow[Any],
                node: str | None) -> list[EvalCase]:
    """Raise UserError, before anything is paid, when `node` is not a node of `flow`, or when
    cases' inputs do not fit the flow's state schema (unknown fields; values of the wrong
    type, where the schema says). Cases that replay a recorded request are not checked.

    Returns the cases to run: as given, except that a number read from a CSV cell (or
    JSON) for a text field becomes its text again (an order id `88231` given to a `str`
    field); run these, not the ones given."""
    if node is not None and node not in flow.nodes:
        close = difflib.get_close_matches(node, list(flow.nodes), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"flow {flow.name!r} has no node {node!r}{hint}; its nodes: "
                        f"{', '.join(flow.nodes)}")
    fields = _state_fields(flow.state)
    if fields is None:
        return list(cases)  # a state without declared fields (dict, Any): nothing to check
    problems: dict[str, list[str]] = {}
    fitted: list[EvalCase] = []
    for case in cases:
        if case.request is not None:
            fitted.append(case)
            continue
        found, inputs = _fit(case.inputs, fields)
        if found:
            problems[case.id] = found
        fitted.append(case if inputs is None else dataclasses.replace(case, inputs=inputs))
    if not problems:
        return fitted
    shown = "; ".join(f"case {cid!r}: {', '.join(p)}"
                      for cid, p in list(problems.items())[:_SHOWN])
    more = f" (and {len(problems) - _SHOWN} more cases)" if len(problems) > _SHOWN else ""
    raise UserError(
        f"{len(problems)} of {len(cases)} cases do not fit flow {flow.name!r}'s input "
        f"({getattr(flow.state, '__name__', 'state')}: {', '.join(fields) or 'no fields'}): "
        f"{shown}{more}; fix those fields in the data set")


_Check = Callable[[Any], None] | None  # validates one field's value (None: anything goes)


def _state_fields(state: Any) -> dict[str, _Check] | None:
    """The state schema's fields and a check of each value, or None when it declares none."""
    if isinstance(state, type) and issubclass(state, BaseModel):
        return {name: _checker(f.rebuild_annotation()) for name, f in state.model_fields.items()}
    if typing_extensions.is_typeddict(state) or (isinstance(state, type) and
                                      hasattr(state, "__dataclass_fields__")):
        try:
            hints = typing.get_type_hints(state, include_extras=True)
        except Exception:  # unresolvable forward references: names only
            hints = {k: Any for k in getattr(state, "__annotations__", {})}
        return {name: _checker(hint) for name, hint in hints.items()}
    return None


def _checker(hint: Any) -> _Check:
    """A check of one field's values, or None for a field that takes anything, or whose
    values a LangGraph reducer converts (messages given as dicts or strings)."""
    if typing.get_origin(hint) is typing.Annotated and any(
            callable(m) and not isinstance(m, type) for m in hint.__metadata__):
        return None
    if hint is Any:
        return None
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(hint)
    except Exception:  # a type pydantic cannot check: the flow will say
        return None
    return adapter.validate_python


def _fit(inputs: Mapping[str, Any], fields: Mapping[str, _Check]
         ) -> tuple[list[str], dict[str, Any] | None]:
    """What is wrong with `inputs`, and the inputs with numbers for text fields turned back
    into text (None: nothing changed)."""
    if not inputs:
        return ["no inputs"], None
    found: list[str] = []
    fixed: dict[str, Any] = {}
    for key, value in inputs.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            found.append(f"unknown field {key!r}" + (f" (did you mean {close[0]!r}?)"
                                                     if close else ""))
            continue
        check = fields[key]
        if check is None:
            continue
        try:
            check(value)
        except ValidationError as e:
            text = _as_text(value, check)
            if text is not None:
                fixed[key] = text
                continue
            err = e.errors()[0]
            found.append(f"field {key!r}: {err['msg'].lower()}, got {_short(value)}")
    return found, ({**inputs, **fixed} if fixed else None)


def _as_text(value: Any, check: Callable[[Any], None]) -> str | None:
    """A number's text, when the field takes that text (else None)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    text = json.dumps(value)
    try:
        check(text)
    except ValidationError:
        return None
    return text


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
