"""Several teachers in one run: each rollout is scored by the teacher its example names.

Rows are grouped by teacher and the groups are scored in parallel threads (served teachers spend that time
waiting on the network; local ones release the GIL inside torch).
"""

from __future__ import annotations

import torch

from opdplus.teachers.base import Teacher, TokenRows
from opdplus.teachers.concurrency import map_concurrently
from opdplus.teachers.distribution import TopKDistribution

DEFAULT = "default"


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

    def score(self, rollouts, routes: list[str | None]) -> torch.Tensor:
        """Teacher log-probs of exactly the response's token ids: float32 [N, T] on the rollouts' device, 0 after
        each row's end (tool results are scored too, in place; the loss masks them out). routes[n] names row n's
        teacher (None: the default one)."""
        groups = _groups(routes)
        if len(groups) == 1:
            return self.teachers[next(iter(groups))].score(rollouts)
        parts = self._ask_each(rollouts, groups, lambda teacher, rows: teacher.score(rows))
        input_ids = rollouts.input_ids  # [N, P + T]
        scores = torch.zeros(input_ids.shape[0], input_ids.shape[1] - rollouts.prompt_length, dtype=torch.float32,
                             device=input_ids.device)  # [N, T]
        for name, rows in groups.items():
            scores[torch.tensor(rows, device=input_ids.device)] = parts[name]
        return scores

    def distribution(self, rollouts, routes: list[str | None], top_k: int | None):
        """(scores [N, T] as `score` gives them, each row's teacher distribution at every response position: the
        whole one (top_k None, one local teacher) or its top_k tokens (any teachers))."""
        groups = _groups(routes)
        if len(groups) == 1:
            return self.teachers[next(iter(groups))].distribution(rollouts, top_k)
        if top_k is None:
            raise ValueError("--estimator dense with several teachers is not supported (their heads differ); "
                             "use --estimator topk:K")
        parts = self._ask_each(rollouts, groups, lambda teacher, rows: teacher.distribution(rows, top_k))
        device, rows = rollouts.input_ids.device, rollouts.input_ids.shape[0]
        width = rollouts.input_ids.shape[1] - rollouts.prompt_length
        scores = torch.zeros(rows, width, dtype=torch.float32, device=device)  # [N, T]
        token_ids = torch.zeros(rows, width, top_k, dtype=torch.long, device=device)  # [N, T, K]
        logprobs = torch.zeros(rows, width, top_k, dtype=torch.float32, device=device)  # [N, T, K]
        for name, members in groups.items():
            index = torch.tensor(members, device=device)
            group_scores, top = parts[name]
            scores[index], token_ids[index], logprobs[index] = group_scores, top.token_ids.to(device), \
                top.logprobs.float().to(device)
        return scores, TopKDistribution(token_ids, logprobs)

    def _ask_each(self, rollouts, groups: dict[str, list[int]], ask) -> dict:
        """{teacher name: ask(teacher, its rows of the rollouts)}, the teachers asked in parallel threads."""
        def ask_group(name: str):
            return ask(self.teachers[name], TokenRows.select(rollouts, groups[name]))

        return dict(zip(groups, map_concurrently(ask_group, list(groups), len(groups))))

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()


def _groups(routes: list[str | None]) -> dict[str, list[int]]:
    """teacher name -> the rows it scores, in order (None: the default teacher)."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(routes):
        groups.setdefault(name or DEFAULT, []).append(row)
    return groups
