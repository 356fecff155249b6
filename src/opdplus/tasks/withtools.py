"""Any task, with tools the model may call during its rollouts (multi-turn: opdplus.rollout.hf)."""

from __future__ import annotations

import dataclasses

from opdplus.tasks.base import Example
from opdplus.tools import ToolBox


class WithTools:
    """Wraps a task: examples that list no tools of their own get the toolbox's schemas, rollouts run up to
    `max_turns` assistant turns, and verification (of the last assistant turn) is the task's own."""

    def __init__(self, task, toolbox: ToolBox, max_turns: int = 4):
        if max_turns < 1:
            raise ValueError(f"max_tool_turns must be a positive integer, got {max_turns}")
        self.task, self.toolbox, self.max_turns = task, toolbox, max_turns
        self.name, self.max_new_tokens, self.reads_files = task.name, task.max_new_tokens, task.reads_files

    def _with_tools(self, examples: list[Example]) -> list[Example]:
        schemas = tuple(self.toolbox.schemas)
        return [example if example.tools else dataclasses.replace(example, tools=schemas) for example in examples]

    def load(self, split: str) -> list[Example]:
        """A data task's records (only when `reads_files`), every one once, in file order."""
        return self._with_tools(self.task.load(split))

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        return self._with_tools(self.task.examples(split, n, seed))

    def verify(self, completion: str, example: Example) -> bool:
        return self.task.verify(completion, example)
