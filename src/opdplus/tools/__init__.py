"""Tools the model may call in multi-turn rollouts, and reading calls out of its text.

`ToolBox` holds the functions and their schemas, `load_tools` finds a set by name, `parse_calls` reads the
model's calls (json / ast only), `format_tools_plain` describes tools where the chat template cannot.
"""

from opdplus.tools.parsing import parse_calls
from opdplus.tools.plain_text import format_tools_plain
from opdplus.tools.registry import TOOL_SETS, load_tools
from opdplus.tools.toolbox import MAX_RESULT_CHARS, ToolBox

__all__ = ["MAX_RESULT_CHARS", "TOOL_SETS", "ToolBox", "format_tools_plain", "load_tools", "parse_calls"]
