"""Several built-in tasks in one stream, each example naming its own teacher (its task's name).

This is multi-teacher distillation in miniature: `opdplus train --task mix --config two_teachers.yaml` with
`teachers: {arith: tiny:arith-teacher, toolcall: tiny:toolcall-teacher}` distills both into one student.
"""

from __future__ import annotations

from dataclasses import replace

from opdplus.tasks.base import Example


class MixTask:
    name = "mix"
    toolbox = None  # single-turn
    max_turns = 1
    reads_files = False

    def __init__(self, parts: dict):
        self.parts = parts  # task name -> task
        self.max_new_tokens = max(task.max_new_tokens for task in parts.values())

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]:
        """Round-robin over the parts; example i comes from part i mod len(parts)."""
        per_part = -(-n // len(self.parts))
        streams = {name: task.examples(split, per_part, seed) for name, task in self.parts.items()}
        names = list(self.parts)
        return [
            replace(streams[names[i % len(names)]][i // len(names)], teacher=names[i % len(names)],
                    reference={"task": names[i % len(names)],
                               "reference": streams[names[i % len(names)]][i // len(names)].reference})
            for i in range(n)
        ]

    def verify(self, completion: str, example: Example) -> bool:
        part = example.reference["task"]
        return self.parts[part].verify(completion, replace(example, reference=example.reference["reference"]))
