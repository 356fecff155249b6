"""Token lists <-> the padded prompt | response layout teachers score.

Served teachers send lists (JSON) and take them from rollouts here; `score_sequences` scores lists given by hand
(tests, benchmarks, a dataset) with any teacher by laying them out as rollouts.
"""

from __future__ import annotations

import torch

from opdplus.rollout import left_pad, right_pad
from opdplus.teachers.base import Teacher, TokenRows


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


def to_sequences(rollouts) -> tuple[list[list[int]], list[int]]:
    """Each row's real tokens (the prompt without its left padding, then the response: the sampled tokens and,
    in a multi-turn rollout, the tool results between them) and the index where the response starts."""
    input_ids, attention_mask = rollouts.input_ids.cpu(), rollouts.attention_mask.cpu()
    sequences = [ids[keep.bool()].tolist() for ids, keep in zip(input_ids, attention_mask)]
    starts = attention_mask[:, : rollouts.prompt_length].sum(1).tolist()  # the prompt's real tokens
    return sequences, starts


def from_sequences(sequences: list[list[int]], starts: list[int], pad_id: int = 0) -> TokenRows:
    """Rows laid out as rollouts: ids[:start] left-padded as the prompt, the rest right-padded as the response."""
    prompt_ids, prompt_mask = left_pad([ids[:begin] for ids, begin in zip(sequences, starts)], pad_id)
    response_ids, response_mask = right_pad([ids[begin:] for ids, begin in zip(sequences, starts)], pad_id)
    return TokenRows(torch.cat([prompt_ids, response_ids], 1), torch.cat([prompt_mask, response_mask], 1),
                     prompt_ids.shape[1])


def score_sequences(teacher: Teacher, sequences: list[list[int]], start: list[int] | None = None) -> list[torch.Tensor]:
    """For each sequence, float32 log p(ids[t] | ids[:t]) for t = start[i] .. len - 1 (CPU tensors).

    `start` defaults to 1 for every sequence (the first token has no context to be scored in).
    """
    starts = resolve_starts(sequences, start)
    if not sequences:
        return []
    scores = teacher.score(from_sequences(sequences, starts)).cpu()
    return [scores[row, : len(ids) - begin] for row, (ids, begin) in enumerate(zip(sequences, starts))]
