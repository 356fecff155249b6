"""Tool sets by name: a built-in set, or the user's own functions as `module:attribute`."""

from __future__ import annotations

import importlib

from opdplus.tools.arithmetic import add, divide, multiply, subtract
from opdplus.tools.toolbox import ToolBox

TOOL_SETS = {"arithmetic": [add, subtract, multiply, divide]}


def load_tools(spec: str) -> ToolBox:
    """A built-in tool set by name, or `module:attribute` naming a list (or name -> function dict) of the
    user's own functions; importing that module runs the user's code, which is what they asked for."""
    if spec in TOOL_SETS:
        return ToolBox(TOOL_SETS[spec])
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"tools: {spec!r} is neither a built-in set ({', '.join(TOOL_SETS)}) nor module:attribute")
    try:
        functions = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"tools: cannot load {spec!r}: {error}") from None
    return ToolBox(functions)
