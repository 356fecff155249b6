"""Several teachers in one run: each rollout is scored by the teacher its example names.

Rows are grouped by teacher and the groups are scored in parallel threads (served teachers spend that time
waiting on the network; local ones release the GIL inside torch).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from opdplus.teachers.base import Teacher

DEFAULT = "default"


def response_sequences(input_ids, attention_mask, response_mask) -> tuple[list[list[int]], list[int]]:
    """Each row's real tokens (the prompt without its left padding, then the response: the sampled tokens and,
    in a multi-turn rollout, the tool results between them) and the index where the response starts."""
    width = response_mask.shape[1]  # the response region is the last `width` columns
    sequences, starts = [], []
    for ids, keep in zip(input_ids, attention_mask):
        tokens = ids[keep.bool()].tolist()
        sequences.append(tokens)
        starts.append(len(tokens) - int(keep[-width:].sum()))
    return sequences, starts


class TeacherRouter:
    """Maps a teacher name (from the example) to a Teacher; unnamed examples go to the default teacher."""

    def __init__(self, teachers: dict[str, Teacher]):
        if not teachers:
            raise ValueError("at least one teacher is needed")
        self.teachers = teachers

    def check_routes(self, names: set[str | None]) -> None:
        """Fail before training when an example names a teacher that is not configured."""
        missing = sorted(str(name) for name in names if (name or DEFAULT) not in self.teachers)
        if missing:
            raise ValueError(f"examples name teachers that are not configured: {', '.join(missing)}; "
                             f"configured: {', '.join(sorted(self.teachers))}")

    def check_tokenizer(self, tokenizer) -> None:
        for teacher in self.teachers.values():
            teacher.check_tokenizer(tokenizer)

    def score(self, input_ids, attention_mask, response_mask, routes: list[str | None]) -> torch.Tensor:
        """Teacher log-probs of exactly the response's token ids: float32 [N, T], 0 after each row's end (tool
        results are scored too, in place; the loss masks them out)."""
        sequences, starts = response_sequences(input_ids, attention_mask, response_mask)
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(routes):
            groups.setdefault(name or DEFAULT, []).append(row)
        scores = torch.zeros(response_mask.shape, dtype=torch.float32)

        def score_group(name: str) -> None:
            rows = groups[name]
            values = self.teachers[name].token_logprobs([sequences[r] for r in rows], [starts[r] for r in rows])
            for row, row_values in zip(rows, values):
                scores[row, : len(row_values)] = row_values

        if len(groups) == 1:
            score_group(next(iter(groups)))
        else:
            with ThreadPoolExecutor(max_workers=len(groups)) as pool:
                list(pool.map(score_group, groups))
        return scores.to(response_mask.device)

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()
