"""Tool calls out of model text, read with `json` and `ast` only: no eval, exec or compile.

Completions are untrusted model output. Accepted forms:

    {"name": "f", "arguments": {"a": 1}}              (or "parameters"; or a list of these)
    <tool_call>{"name": "f", "arguments": {...}}</tool_call>   (Qwen/Hermes; several allowed)
    [f(a=1), math.factorial(n=5)]                     (BFCL's Python syntax; or one bare call)

Multi-turn rollouts call the parsed tools; the BFCL task grades the parsed calls.
"""

import ast
import json
import re
import warnings
from typing import Any

MAX_COMPLETION_CHARS = 100_000
TOOL_CALL_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)  # last one may be unclosed
CODE_FENCE = re.compile(r"^```[\w-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)
JSON_NAMES = {"true": True, "false": False, "null": None}  # JSON literals written in a Python call


def parse_calls(completion: str, keep_tuples: bool = False) -> list[dict] | None:
    """Model output -> [{"name": str, "arguments": dict}, ...], or None if it is not a call list.

    keep_tuples: Python tuples in arguments stay tuples (BFCL grading tells them from lists).
    """
    try:
        if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
            return None
        return _parse(completion.strip(), keep_tuples)
    except Exception:  # hostile text: RecursionError, MemoryError, ValueError from huge ints...
        return None


def _parse(text: str, keep_tuples: bool = False) -> list[dict] | None:
    if "<tool_call>" in text:
        calls = []
        for block in TOOL_CALL_BLOCK.findall(text):
            block_calls = _parse_json_calls(block.strip())
            if block_calls is None:
                return None
            calls.extend(block_calls)
        return calls or None
    fence = CODE_FENCE.match(text)
    if fence:
        text = fence.group(1).strip()
    calls = _parse_json_calls(text)
    return calls if calls is not None else _parse_python_calls(text, keep_tuples)


def _reject_constant(token: str):
    raise ValueError(f"non-standard JSON constant {token}")  # NaN, Infinity


def _parse_json_calls(text: str) -> list[dict] | None:
    try:
        document = json.loads(text, parse_constant=_reject_constant)
    except ValueError:
        return None
    items = document if isinstance(document, list) else [document]
    calls = [_call_from_json(item) for item in items]
    return None if any(call is None for call in calls) else calls


def _call_from_json(item: Any) -> dict | None:
    if not isinstance(item, dict):
        return None
    if "name" not in item and isinstance(item.get("function"), dict):
        item = item["function"]  # OpenAI's {"type": "function", "function": {...}}
    name = item.get("name")
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):  # OpenAI sends the arguments as a JSON string
        try:
            arguments = json.loads(arguments, parse_constant=_reject_constant)
        except ValueError:
            return None
    if not (isinstance(name, str) and name and isinstance(arguments, dict)):
        return None
    return {"name": name, "arguments": arguments}


def _parse_python_calls(text: str, keep_tuples: bool = False) -> list[dict] | None:
    try:
        with warnings.catch_warnings():  # "invalid escape sequence" in model text is not our concern
            warnings.simplefilter("ignore")
            body = ast.parse(text, mode="eval").body  # parses only; nothing is compiled or run
    except SyntaxError:
        return None
    nodes = body.elts if isinstance(body, (ast.List, ast.Tuple)) else [body]
    calls = []
    for node in nodes:
        if not isinstance(node, ast.Call) or node.args:  # positional arguments have no names to check
            return None
        name = _dotted_name(node.func)
        if name is None or any(keyword.arg is None for keyword in node.keywords):  # **kwargs
            return None
        try:
            arguments = {keyword.arg: _literal(keyword.value, keep_tuples) for keyword in node.keywords}
        except ValueError:
            return None
        calls.append({"name": name, "arguments": arguments})
    return calls


def _dotted_name(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        owner = _dotted_name(node.value)
        return None if owner is None else f"{owner}.{node.attr}"
    return None


def _literal(node: ast.expr, keep_tuples: bool = False) -> Any:
    """A JSON-like value from a literal node; tuples become lists unless keep_tuples. ValueError for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (str, int, float, bool, type(None))):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        elements = [_literal(element, keep_tuples) for element in node.elts]
        return tuple(elements) if keep_tuples and isinstance(node, ast.Tuple) else elements
    if isinstance(node, ast.Dict) and None not in node.keys:  # a None key is a `**spread`
        keys = [_literal(key, keep_tuples) for key in node.keys]
        if not all(isinstance(key, (str, int, float, bool)) for key in keys):
            raise ValueError("unhashable dict key")
        return dict(zip(keys, (_literal(value, keep_tuples) for value in node.values)))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _literal(node.operand, keep_tuples)
        if isinstance(operand, (int, float)) and not isinstance(operand, bool):
            return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.Name) and node.id in JSON_NAMES:
        return JSON_NAMES[node.id]
    raise ValueError(f"not a literal: {type(node).__name__}")
