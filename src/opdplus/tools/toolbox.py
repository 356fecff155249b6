"""A task's or the user's tools for multi-turn rollouts: plain Python functions, called by parsed name.

The model's output is only ever *parsed* (opdplus.tools.parsing.parse_calls: json / ast, nothing executed);
the parsed name selects one of these functions and the parsed literal arguments are passed to it. A call
that fails for any reason (unknown name, bad arguments, an exception inside the tool) becomes an error
message for the model, never an error of the run.

Schemas come from each function's type hints and Google-style docstring (transformers' `get_json_schema`),
so a tool is just a documented, typed function:

    def multiply(a: float, b: float) -> float:
        '''Multiply two numbers.

        Args:
            a: the first factor
            b: the second factor
        '''
        return a * b
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

MAX_RESULT_CHARS = 2000  # a tool result longer than this is cut, so one call cannot flood the context


class ToolBox:
    """Named tool functions and their JSON schemas ({"name", "description", "parameters"})."""

    def __init__(self, functions: list[Callable] | dict[str, Callable], *, max_result_chars: int = MAX_RESULT_CHARS):
        from transformers.utils import get_json_schema

        if isinstance(functions, dict):
            self.functions = dict(functions)
        elif isinstance(functions, (list, tuple)):
            self.functions = {getattr(function, "__name__", repr(function)): function for function in functions}
        else:
            self.functions = {}
        if not self.functions or not all(callable(function) for function in self.functions.values()):
            raise ValueError("tools must be a non-empty list (or name -> function dict) of Python functions")
        self.schemas = []
        for name, function in self.functions.items():
            try:
                schema = get_json_schema(function)["function"]
            except Exception as error:  # noqa: BLE001 - transformers raises several kinds here
                raise ValueError(f"tool {name!r} needs type hints and a docstring with an Args section: {error}")
            self.schemas.append({**schema, "name": name})
        self.max_result_chars = max_result_chars

    def call(self, name: Any, arguments: Any) -> str:
        """The result of one call as the text the model will read, never longer than `max_result_chars`."""
        return self._call(name, arguments)[: self.max_result_chars]

    def _call(self, name: Any, arguments: Any) -> str:
        function = self.functions.get(name) if isinstance(name, str) else None
        if function is None:  # the name is model text: show only its start, so the list of tools survives the cut
            return f"error: unknown tool {_shortened(name)}; available: {', '.join(sorted(self.functions))}"
        if not isinstance(arguments, dict):
            return "error: arguments must be an object of named parameters"
        try:
            result = function(**arguments)
        except Exception as error:  # noqa: BLE001 - the model sees what went wrong and may retry
            return f"error: {type(error).__name__}: {error}"
        if isinstance(result, str):
            return result
        try:
            return json.dumps(result, ensure_ascii=False, default=str)
        except (ValueError, TypeError, RecursionError) as error:  # a circular or too deeply nested result
            return f"error: the tool's result cannot be written as JSON: {error}"


def _shortened(value: Any, limit: int = 80) -> str:
    """The start of repr(value), without building the repr of a huge container first."""
    if isinstance(value, (list, dict, tuple, set)) and len(value) > limit:
        return f"<{type(value).__name__} of {len(value)} items>"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
