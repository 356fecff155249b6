"""What every teacher offers the trainer: log-probs of given token ids, and a vocabulary check.

A teacher scores the student's samples token by token, so it must read the student's token ids exactly as the
student meant them: `check_tokenizer` runs before training and refuses a teacher with another vocabulary.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

# The same opening as opdplus.vocab.check_same_vocabulary, so every mismatch reads alike.
MISMATCH = "tokenizer mismatch between student and teacher"


class TeacherUnavailableError(RuntimeError):
    """A served teacher did not answer (connection refused, timeouts, 5xx) even after retries."""


@runtime_checkable
class Teacher(Protocol):
    name: str

    def token_logprobs(self, sequences: list[list[int]], start: list[int] | None = None) -> list[torch.Tensor]:
        """For each sequence, float32 log p(ids[t] | ids[:t]) for t = start[i] .. len - 1 (CPU tensors).

        `start` defaults to 1 for every sequence (the first token has no context to be scored in).
        """
        ...

    def check_tokenizer(self, tokenizer) -> None:
        """Raise ValueError ("tokenizer mismatch between student and teacher: ...") unless ids mean the same."""
        ...

    def close(self) -> None: ...


def resolve_starts(sequences: list[list[int]], start: list[int] | None) -> list[int]:
    """Validate `start` against the sequences; default 1 everywhere. start == len gives an empty result."""
    if start is None:
        start = [1] * len(sequences)
    if len(start) != len(sequences):
        raise ValueError(f"got {len(start)} start positions for {len(sequences)} sequences")
    for i, (ids, begin) in enumerate(zip(sequences, start)):
        if not 1 <= begin <= len(ids):
            raise ValueError(f"sequence {i}: start must be in [1, {len(ids)}] (its length), got {begin}")
    return list(start)


def probe_strings(tokenizer) -> list[str]:
    """Texts whose token ids must agree between student and a served teacher: digits, punctuation,
    spaces and newlines, and every special token of the student, alone and inside ordinary text."""
    probes = [
        "0123456789 12+34=46 -7.5e3",
        "Hello, world! How are you? (fine); [ok] {yes} <no> 'a' \"b\" `c` ~@#$%^&*_|\\/",
        "  two  spaces, a\ttab and a\nnewline\n\n",
        '{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}',
    ]
    specials = [token for token in tokenizer.all_special_tokens if token]
    probes += specials
    if specials:
        probes.append("x = 1" + "".join(f"{token}word {index}" for index, token in enumerate(specials)))
    return probes
