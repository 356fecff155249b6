"""Verifiable tasks: prompts, gold responses and programmatic verifiers.

Built-in synthetic tasks (`arith`, `toolcall`, and `mix` of both, one teacher each) need no data; `math`
(GSM8K / MATH style, checked with math-verify) and `tooluse` (BFCL format, AST-checker semantics) read files.
"""

from opdplus.tasks.arith import ArithTask
from opdplus.tasks.base import Example, Task
from opdplus.tasks.math import MathTask
from opdplus.tasks.mix import MixTask
from opdplus.tasks.toolcall import ToolCallTask
from opdplus.tasks.tooluse import ToolUseTask

BUILT_IN = {"arith": ArithTask, "toolcall": ToolCallTask}
DATA_TASKS = ("math", "tooluse")
TASKS = (*BUILT_IN, "mix", *DATA_TASKS)


def get_task(name: str, *, data: str | None = None, test_data: str | None = None, question_field: str = "question",
             answer_field: str = "answer", teacher_field: str = "teacher", max_new_tokens: int | None = None) -> Task:
    """A task by name; `math` and `tooluse` read `data` (train split) and `test_data` (held-out split)."""
    if name in BUILT_IN:
        return BUILT_IN[name]()
    if name == "mix":
        return MixTask({part: task() for part, task in BUILT_IN.items()})
    if name not in DATA_TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    if data is None and test_data is None:
        raise ValueError(f"task {name!r} reads data files: pass --data (and --test-data for evaluation)")
    length = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
    if name == "math":
        return MathTask(train_path=data, test_path=test_data, question_field=question_field,
                        answer_field=answer_field, teacher_field=teacher_field, **length)
    return ToolUseTask(train_path=data, test_path=test_data, teacher_field=teacher_field, **length)


__all__ = ["Example", "Task", "TASKS", "get_task", "ArithTask", "ToolCallTask", "MathTask", "ToolUseTask", "MixTask"]
