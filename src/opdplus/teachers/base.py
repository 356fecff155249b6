"""What every teacher offers the trainer: log-probs of the rollouts' token ids, and a vocabulary check.

A teacher scores the student's samples token by token, so it must read the student's token ids exactly as the
student meant them: `check_tokenizer` runs before training and refuses a teacher with another vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

class TeacherUnavailableError(RuntimeError):
    """A served teacher did not answer (connection refused, timeouts, 5xx) even after retries."""


@dataclass(frozen=True)
class TokenRows:
    """The part of a `Rollouts` a teacher reads. Teachers take any object with these three attributes, so a
    `Rollouts` is scored as it is; this class carries a subset of its rows, or token lists laid out alike."""

    input_ids: torch.Tensor  # [N, P + T] prompts left-padded to P, then responses right-padded to T
    attention_mask: torch.Tensor  # [N, P + T] 1 on real tokens: the prompt, then the response through its end
    prompt_length: int  # P

    @classmethod
    def select(cls, rollouts, rows: list[int]) -> TokenRows:
        """These rows of `rollouts`, in this order."""
        index = torch.tensor(rows, device=rollouts.input_ids.device)
        return cls(rollouts.input_ids[index], rollouts.attention_mask[index], rollouts.prompt_length)


@runtime_checkable
class Teacher(Protocol):
    name: str

    def score(self, rollouts: TokenRows) -> torch.Tensor:
        """float32 [N, T] on `rollouts.input_ids.device`: log p(token | everything before it) for every real
        token of each response (in a multi-turn rollout the tool results too), 0 after each row's end."""
        ...

    def distribution(self, rollouts: TokenRows, top_k: int | None = None) -> tuple[torch.Tensor, object]:
        """(`score(rollouts)`, the teacher's next-token distribution at every response position): its `top_k`
        most likely tokens (`TopKDistribution`, every teacher), or with top_k None the whole vocabulary
        (`DenseDistribution`; a local teacher only, the others raise a one-line ValueError)."""
        ...

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError ("tokenizer mismatch between student and teacher: ...") unless ids mean the same."""
        ...

    def close(self) -> None: ...
