"""Verifiable tasks: prompts, gold responses and programmatic verifiers."""

from opdplus.tasks.arith import ArithTask
from opdplus.tasks.base import Example, Task
from opdplus.tasks.toolcall import ToolCallTask

TASKS = {"arith": ArithTask, "toolcall": ToolCallTask}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]()


__all__ = ["Example", "Task", "TASKS", "get_task", "ArithTask", "ToolCallTask"]
