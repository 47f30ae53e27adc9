"""A run's input checked against its flow's input fields before anything is written or called.

Which fields a flow takes, and which it requires:

- `Flow(..., input_schema=Schema)` declares them: only Schema's fields are accepted, and its
  required ones (a TypedDict's required keys, a pydantic model's or dataclass's fields
  without a default) must be given.
- Otherwise the state schema's fields are accepted, and only the ones the state explicitly
  requires: `Required[...]` keys of a TypedDict (totality alone does not count: nodes fill
  the other keys, so a `total=True` state says nothing about a run's input), pydantic fields
  and dataclass fields without a default.

Unknown fields (with close-match suggestions) and values of the wrong type (checked strictly
with pydantic, as JSON gives them) are always refused. Fields with a reducer
(`Annotated[list, operator.add]`, `add_messages`) are not type-checked: their reducer
converts what it is given.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NotRequired, Required

from pydantic import BaseModel, TypeAdapter, ValidationError

from .exceptions import UserError

if TYPE_CHECKING:
    from .flow import Flow

__all__ = ["InputError", "InputField", "check_input", "describe_fields", "input_fields"]


class InputError(UserError):
    """A run's input does not fit its flow's input fields."""

    flow: str

    def __init__(self, message: str, *, flow: str = "") -> None:
        super().__init__(message)
        self.flow = flow


@dataclass(frozen=True)
class InputField:
    """One field a flow's input may have."""

    name: str
    type: str
    """The annotation as shown to a person, e.g. `str`, `list[str]`, `int | None`."""
    required: bool
    annotation: Any = dataclasses.field(default=None, compare=False, repr=False)
    checked: bool = dataclasses.field(default=True, compare=False, repr=False)
    """False for fields whose value a reducer converts (or typed `Any`): not type-checked."""

    def describe(self) -> str:
        return f"{self.name} ({self.type}{'' if self.required else ', optional'})"

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "type": self.type, "required": self.required}


def input_fields(flow: Flow[Any]) -> list[InputField] | None:
    """The fields `flow`'s input may have (None: its schema is not one we can read)."""
    declared = getattr(flow, "input_schema", None)
    return _fields(declared if declared is not None else flow.state, declared is not None)


def describe_fields(fields: list[InputField]) -> str:
    """`ticket (str), customer_tier (str, optional)`."""
    return ", ".join(f.describe() for f in fields) or "none"


def check_input(flow: Flow[Any], value: Any) -> None:
    """Raise InputError naming every missing, unknown or mistyped field, in one line."""
    fields = input_fields(flow)
    if fields is None:
        return
    schema = getattr(flow, "input_schema", None) or flow.state
    if not typing.is_typeddict(schema) and isinstance(value, schema):
        return  # an instance of the schema itself (a pydantic or dataclass state)
    expected = f"expected fields: {describe_fields(fields)}"
    if not isinstance(value, Mapping):
        raise InputError(f"input for {flow.name}: must be an object of fields, not "
                         f"{type(value).__name__}; {expected}", flow=flow.name)
    problems = _problems(fields, value)
    if problems:
        raise InputError(f"input for {flow.name}: {'; '.join(problems)}; {expected}",
                         flow=flow.name)


def _problems(fields: list[InputField], value: Mapping[Any, Any]) -> list[str]:
    by_name = {f.name: f for f in fields}
    problems: list[str] = []
    missing = [f.name for f in fields if f.required and f.name not in value]
    if missing:
        problems.append(f"missing required field{'s' if len(missing) > 1 else ''} "
                        + ", ".join(repr(m) for m in missing))
    for key in value:
        if key not in by_name:
            close = difflib.get_close_matches(str(key), list(by_name), n=1)
            problems.append(f"unknown field {str(key)!r}"
                            + (f" (did you mean {close[0]!r}?)" if close else ""))
    for key, v in value.items():
        f = by_name.get(key)
        if f is not None and f.checked and not _fits(f.annotation, v):
            problems.append(f"field {f.name!r} should be {f.type}, got {type(v).__name__}")
    return problems


def _fields(schema: Any, declared: bool) -> list[InputField] | None:
    try:
        if typing.is_typeddict(schema):
            return _typeddict_fields(schema, declared)
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            return [_field(n, f.annotation, f.is_required(), f.metadata)
                    for n, f in schema.model_fields.items()]
        if dataclasses.is_dataclass(schema) and isinstance(schema, type):
            hints = typing.get_type_hints(schema, include_extras=True)
            return [_field(f.name, hints.get(f.name, Any),
                           f.default is dataclasses.MISSING
                           and f.default_factory is dataclasses.MISSING)
                    for f in dataclasses.fields(schema)]
    except (NameError, TypeError):  # annotations that do not resolve: no check at all
        return None
    return None


def _typeddict_fields(schema: Any, declared: bool) -> list[InputField]:
    hints = typing.get_type_hints(schema, include_extras=True)
    out = []
    for name, hint in hints.items():
        origin = typing.get_origin(hint)
        if origin in (Required, NotRequired):
            hint = typing.get_args(hint)[0]
        # The marker itself first: string annotations (`from __future__ import annotations`)
        # leave __required_keys__ blind to Required/NotRequired on Python < 3.12.
        required = (origin is Required or (declared and origin is not NotRequired
                                           and name in schema.__required_keys__))
        out.append(_field(name, hint, required))
    return out


def _field(name: str, hint: Any, required: bool, metadata: list[Any] | None = None) -> InputField:
    extra = list(metadata or [])
    if typing.get_origin(hint) is typing.Annotated:
        extra += list(hint.__metadata__)
        hint = typing.get_args(hint)[0]
    origin = typing.get_origin(hint)
    if origin in (Required, NotRequired):
        hint = typing.get_args(hint)[0]
    reducer = any(callable(m) and not isinstance(m, type) for m in extra)
    return InputField(name, _shown(hint), required, hint,
                      checked=not reducer and hint is not Any and _adapter(hint) is not None)


def _shown(hint: Any) -> str:
    if hint is type(None):
        return "None"
    if isinstance(hint, type) and typing.get_origin(hint) is None:
        return hint.__name__
    return str(hint).replace("typing.", "").replace("NoneType", "None")


@functools.lru_cache(maxsize=512)
def _cached_adapter(hint: Any) -> TypeAdapter[Any] | None:
    try:
        return TypeAdapter(hint)
    except Exception:  # a type pydantic cannot check (arbitrary classes): not checked
        return None


def _adapter(hint: Any) -> TypeAdapter[Any] | None:
    try:
        return _cached_adapter(hint)
    except TypeError:  # an unhashable annotation
        return None


def _fits(hint: Any, value: Any) -> bool:
    adapter = _adapter(hint)
    if adapter is None:
        return True
    try:
        adapter.validate_python(value, strict=True)
        return True
    except ValidationError:
        pass
    try:  # as JSON gives it: dates as strings, tuples as arrays, enums as their values
        adapter.validate_json(json.dumps(value), strict=True)
        return True
    except (ValidationError, TypeError, ValueError):
        return False
