"""A calculator tool that evaluates arithmetic safely (an AST walk, never eval)."""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

from langchain_core.tools import ToolException, tool

_BINARY: dict[type[ast.operator], Any] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
    ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY: dict[type[ast.unaryop], Any] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCS: dict[str, Any] = {"sqrt": math.sqrt, "abs": abs, "round": round, "min": min, "max": max,
                          "log": math.log, "exp": math.exp}
_MAX_POWER = 1000


def evaluate(expression: str) -> float:
    """The value of an arithmetic expression (+ - * / // % **, parentheses, a few functions)."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as e:
        raise ToolException(f"not an arithmetic expression: {expression!r} ({e.msg})") from None
    return float(_eval(tree.body))


def _eval(node: ast.AST) -> Any:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > _MAX_POWER:
            raise ToolException(f"exponent {right} is too large")
        try:
            return _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolException("division by zero") from None
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCS and not node.keywords):
        return _FUNCS[node.func.id](*[_eval(a) for a in node.args])
    raise ToolException(f"unsupported element in expression: {ast.dump(node)[:60]}")


@tool
def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression, e.g. '(1299 * 0.15) + 4.5' or 'sqrt(2) * 3'."""
    value = evaluate(expression)
    return str(int(value)) if value.is_integer() else f"{value:.10g}"


calculator.handle_tool_error = True  # the model sees the error text and can retry
