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
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(routes):
            groups.setdefault(name or DEFAULT, []).append(row)
        if len(groups) == 1:
            return self.teachers[next(iter(groups))].score(rollouts)

        def score_group(name: str) -> torch.Tensor:  # [rows of this teacher, T]
            return self.teachers[name].score(TokenRows.select(rollouts, groups[name]))

        group_scores = dict(zip(groups, map_concurrently(score_group, list(groups), len(groups))))
        input_ids = rollouts.input_ids  # [N, P + T]
        scores = torch.zeros(input_ids.shape[0], input_ids.shape[1] - rollouts.prompt_length, dtype=torch.float32,
                             device=input_ids.device)  # [N, T]
        for name, rows in groups.items():
            scores[torch.tensor(rows, device=input_ids.device)] = group_scores[name]
        return scores

    def distribution(self, rollouts, routes: list[str | None], top_k: int | None):
        """(scores [N, T] as `score` gives them, each row's teacher distribution at every response position: the
        whole one (top_k None, one local teacher) or its top_k tokens (any teachers))."""
        groups: dict[str, list[int]] = {}
        for row, name in enumerate(routes):
            groups.setdefault(name or DEFAULT, []).append(row)
        if len(groups) == 1:
            return self.teachers[next(iter(groups))].distribution(rollouts, top_k)
        if top_k is None:
            raise ValueError("--estimator dense with several teachers is not supported (their heads differ); "
                             "use --estimator topk:K")

        def group_distribution(name: str):
            return self.teachers[name].distribution(TokenRows.select(rollouts, groups[name]), top_k)

        parts = dict(zip(groups, map_concurrently(group_distribution, list(groups), len(groups))))
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

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()
