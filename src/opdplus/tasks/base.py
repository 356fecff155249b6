"""The task interface: a generator of prompts with a programmatic verifier."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from opdplus.tools import ToolBox

SPLITS = ("train", "test")
TEST_FRACTION = 0.1


@dataclass(frozen=True)
class Example:
    prompt: str  # the user message content (the chat template is applied later)
    reference: Any  # what verify() needs; JSON-serialisable
    response: str  # a gold response, used to SFT the tiny models
    messages: tuple | None = None  # chat messages (dicts) for multi-turn prompts; None: just `prompt`
    tools: tuple | None = None  # JSON schemas of the tools the model may call
    teacher: str | None = None  # which configured teacher scores this example; None: the default one
    id: str | None = None  # the data record's id, if it has one, so `opdplus eval` rows can be traced back


class Task(Protocol):
    """What a task is, and what it can do, declared by every task rather than found by probing for methods."""

    name: str
    max_new_tokens: int  # enough for the longest gold response + EOS, with margin (per turn with tools)
    toolbox: ToolBox | None  # tools the model may call during its rollouts; None: single-turn rollouts
    max_turns: int  # assistant turns per rollout: 1 without tools
    reads_files: bool  # a data task: then `load(split)` gives every record once, in file order

    def examples(self, split: str, n: int, seed: int = 0) -> list[Example]: ...

    def verify(self, completion: str, example: Example) -> bool: ...


def split_of(problem_key: str) -> str:
    """Assign a problem to train or test by a stable hash, so the splits never overlap.

    sha256 rather than hash(): Python's string hash changes between processes.
    """
    bucket = int.from_bytes(hashlib.sha256(problem_key.encode()).digest()[:8], "big") / 2**64
    return "test" if bucket < TEST_FRACTION else "train"


def sample_split(
    task_name: str,
    split: str,
    n: int,
    seed: int,
    draw: Callable[[random.Random], tuple[str, Example]],
) -> list[Example]:
    """Draw i.i.d. examples from a task's distribution restricted to one split.

    `draw(rng)` returns (problem_key, example); draws whose key hashes to the other
    split are rejected. A string seed makes the stream identical across processes.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"{task_name}/{split}/{seed}")
    examples = []
    while len(examples) < n:
        key, example = draw(rng)
        if split_of(key) == split:
            examples.append(example)
    return examples
