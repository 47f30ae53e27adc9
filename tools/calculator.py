"""A calculator tool that evaluates arithmetic safely (an AST walk, never eval).

A model may send any string, so the work is bounded before it is done: the expression's length,
its node count and nesting depth are capped, and every operation whose result could be large
(`**`, `*`, `round` with negative digits) is sized first and refused when its result would exceed
`MAX_DIGITS` decimal digits. Nothing is computed that could hold the event loop (a big-int
power keeps the GIL for its whole duration, so a thread would not help). Every error reaches
the model as a `ToolException` message.
"""

from __future__ import annotations

import ast
import math
import operator
from typing import Any, Callable

from langchain_core.tools import ToolException, tool

MAX_CHARS = 2000  # expression length
MAX_NODES = 1000  # AST nodes
MAX_DEPTH = 200  # AST nesting (the walk recurses once per level)
MAX_DIGITS = 1000  # decimal digits of any integer, intermediate or final
_LIMIT = 10**MAX_DIGITS  # the smallest integer refused
_MAX_ARGS = 100  # arguments of min/max

Number = int | float

_BINARY: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Callable[[Any], Any]] = {ast.USub: operator.neg,
                                                          ast.UAdd: operator.pos}
_FUNCS: dict[str, Callable[..., Any]] = {"sqrt": math.sqrt, "abs": abs, "round": round,
                                         "min": min, "max": max, "log": math.log,
                                         "exp": math.exp}


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression (+ - * / // % **, parentheses, a few functions)."""
    value = compute(expression)
    try:
        return float(value)
    except OverflowError:
        raise ToolException("the result is too large for a float") from None


def compute(expression: str) -> Number:
    """Like `evaluate`, but integers stay exact; every failure is a `ToolException`."""
    if not isinstance(expression, str):
        raise ToolException("the expression must be a string")
    if len(expression) > MAX_CHARS:
        raise ToolException(f"expression is too long ({len(expression)} characters; "
                            f"the limit is {MAX_CHARS})")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError as e:
        raise ToolException(f"not an arithmetic expression: {expression[:100]!r} "
                            f"({e.msg})") from None
    except ValueError as e:  # e.g. a NUL character
        raise ToolException(f"not an arithmetic expression: {e}") from None
    except (RecursionError, MemoryError):  # the parser's own limits on deep nesting
        raise ToolException("expression is nested too deeply") from None
    _check_shape(tree.body)
    try:
        return _eval(tree.body)
    except ToolException:
        raise
    except ZeroDivisionError:
        raise ToolException("division by zero") from None
    except OverflowError:
        raise ToolException("the result is too large") from None
    except (ValueError, TypeError) as e:  # math domain errors, wrong argument counts/types
        raise ToolException(f"invalid operation: {e}") from None
    except (MemoryError, RecursionError):  # not expected within the bounds; never fatal
        raise ToolException("expression is too large to evaluate") from None


def _check_shape(root: ast.AST) -> None:
    """Refuse too many nodes or too deep a tree, iteratively (no recursion on hostile input)."""
    count, stack = 0, [(root, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ToolException(f"expression has too many parts (the limit is {MAX_NODES})")
        if depth > MAX_DEPTH:
            raise ToolException(f"expression is nested too deeply (the limit is {MAX_DEPTH})")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


def _too_large(digits: float) -> ToolException:
    size = (f"about {int(digits) + 1:,} digits" if digits < 1e15
            else f"far more than {MAX_DIGITS} digits")
    return ToolException(f"result would be too large ({size}; the limit is {MAX_DIGITS})")


def _checked(value: Any) -> Number:
    """Every intermediate value: a real, finite number of bounded size."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, complex):
            raise ToolException("the result is not a real number")
        raise ToolException(f"unsupported value of type {type(value).__name__}")
    if isinstance(value, int):
        if abs(value) >= _LIMIT:
            raise _too_large(_log10(value))
    elif not math.isfinite(value):
        raise ToolException("the result is too large (not a finite number)")
    return value


def _log10(x: int) -> float:
    return math.log10(abs(x)) if x else 0.0


def _precheck_binary(op: ast.operator, left: Number, right: Number) -> None:
    """Refuse before computing when an integer result would clearly exceed the size limit
    (one digit of slack for the estimate; `_checked` then applies the exact limit)."""
    if isinstance(op, ast.Pow) and isinstance(left, int) and isinstance(right, int):
        if right > 0 and abs(left) > 1:
            # the exponent's size is checked first so the estimate itself stays a small float
            digits = math.inf if right.bit_length() > 60 else right * _log10(left)
            if digits > MAX_DIGITS + 1:
                raise _too_large(digits)
    elif isinstance(op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
        if left and right and _log10(left) + _log10(right) > MAX_DIGITS + 1:
            raise _too_large(_log10(left) + _log10(right))


def _call(name: str, args: list[Number]) -> Number:
    if name in ("min", "max") and not 1 <= len(args) <= _MAX_ARGS:
        raise ToolException(f"{name}() takes 1 to {_MAX_ARGS} numbers")
    if name == "round" and len(args) == 2:
        digits = args[1]
        if not isinstance(digits, int) or abs(digits) > MAX_DIGITS:
            # round(x, -n) computes 10**n for an integer x
            raise ToolException(f"round() digits must be an integer between {-MAX_DIGITS} "
                                f"and {MAX_DIGITS}")
    return _FUNCS[name](*args)


def _eval(node: ast.AST) -> Number:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool):
        return _checked(node.value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        _precheck_binary(node.op, left, right)
        return _checked(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _checked(_UNARY[type(node.op)](_eval(node.operand)))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS and not node.keywords):
        args = [_eval(a) for a in node.args]
        return _checked(_call(node.func.id, args))
    raise ToolException(f"unsupported element in expression: {ast.dump(node)[:60]}")


def _format(value: Number) -> str:
    if isinstance(value, int):
        return str(value)
    return str(int(value)) if value.is_integer() else f"{value:.10g}"


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression, e.g. '(1299 * 0.15) + 4.5' or 'sqrt(2) * 3'."""
    return _format(compute(expression))


calculator.handle_tool_error = True  # the model sees the error text and can retry
calculator.handle_validation_error = True  # arguments of the wrong shape, too
