"""Several teachers in one run: each rollout is scored by the teacher its example names.

Rows are grouped by teacher and the groups are scored in parallel threads (served teachers spend that time
waiting on the network; local ones release the GIL inside torch). A teacher with another tokenizer or prompt
(`RetokenizingTeacher`) also gets its rows' prompts; when one scores by spans, every row's scores come back as one
`SpanScores` (token-level rows as one-token causal spans).
"""

from __future__ import annotations

import torch

from opdplus.objective.spans import SpanScores
from opdplus.teachers.base import Teacher, TokenRows
from opdplus.teachers.concurrency import map_concurrently
from opdplus.teachers.cross import RetokenizingTeacher, response_mask, select_rows
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

    def score(self, rollouts, routes: list[str | None], prompts: list | None = None) -> torch.Tensor | SpanScores:
        """Teacher log-probs of exactly the response's token ids: float32 [N, T] on the rollouts' device, 0 after
        each row's end (tool results are scored too, in place; the loss masks them out). routes[n] names row n's
        teacher (None: the default one); prompts[n] is row n's prompt, needed when a routed teacher re-tokenizes.
        SpanScores for all rows when a routed teacher scores by spans."""
        groups = _groups(routes)
        self._check_prompts(groups, rollouts, prompts)
        if len(groups) == 1:
            teacher = self.teachers[next(iter(groups))]
            return teacher.score(rollouts, prompts) if isinstance(teacher, RetokenizingTeacher) \
                else teacher.score(rollouts)
        parts = self._ask_each(rollouts, groups, _score, prompts)
        if any(isinstance(part, SpanScores) for part in parts.values()):
            return _merged_spans(rollouts, groups, parts)
        input_ids = rollouts.input_ids  # [N, P + T]
        scores = torch.zeros(input_ids.shape[0], input_ids.shape[1] - rollouts.prompt_length, dtype=torch.float32,
                             device=input_ids.device)  # [N, T]
        for name, rows in groups.items():
            scores[torch.tensor(rows, device=input_ids.device)] = parts[name]
        return scores

    def distribution(self, rollouts, routes: list[str | None], top_k: int | None, prompts: list | None = None):
        """(scores [N, T] as `score` gives them, each row's teacher distribution at every response position: the
        whole one (top_k None, one local teacher) or its top_k tokens (any teachers)). A re-tokenizing teacher
        takes part only with the student's vocabulary (mode "same"); the others refuse in one line."""
        groups = _groups(routes)
        self._check_prompts(groups, rollouts, prompts)
        if len(groups) == 1:
            teacher = self.teachers[next(iter(groups))]
            return teacher.distribution(rollouts, prompts, top_k) if isinstance(teacher, RetokenizingTeacher) \
                else teacher.distribution(rollouts, top_k)
        if top_k is None:
            raise ValueError("--estimator dense with several teachers is not supported (their heads differ); "
                             "use --estimator topk:K")
        parts = self._ask_each(rollouts, groups, lambda teacher, rows, row_prompts: _distribution(
            teacher, rows, row_prompts, top_k), prompts)
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

    def _ask_each(self, rollouts, groups: dict[str, list[int]], ask, prompts: list | None = None) -> dict:
        """{teacher name: ask(teacher, its rows of the rollouts, their prompts or None)}, the teachers asked in
        parallel threads; only re-tokenizing teachers get prompts (and the rows' response masks)."""
        def ask_group(name: str):
            teacher, rows = self.teachers[name], groups[name]
            if isinstance(teacher, RetokenizingTeacher):
                return ask(teacher, select_rows(rollouts, rows), [prompts[row] for row in rows])
            return ask(teacher, TokenRows.select(rollouts, rows), None)

        return dict(zip(groups, map_concurrently(ask_group, list(groups), len(groups))))

    def _check_prompts(self, groups: dict[str, list[int]], rollouts, prompts: list | None) -> None:
        needing = sorted(name for name in groups if isinstance(self.teachers[name], RetokenizingTeacher))
        if needing and (prompts is None or len(prompts) != rollouts.input_ids.shape[0]):
            raise ValueError(f"teachers {', '.join(needing)} render prompts themselves: prompts must give one per "
                             f"rollout row ({rollouts.input_ids.shape[0]}), got "
                             f"{'none' if prompts is None else len(prompts)}")

    def close(self) -> None:
        for teacher in self.teachers.values():
            teacher.close()


def _score(teacher, rows, row_prompts):
    return teacher.score(rows) if row_prompts is None else teacher.score(rows, row_prompts)


def _distribution(teacher, rows, row_prompts, top_k):
    return teacher.distribution(rows, top_k) if row_prompts is None else teacher.distribution(rows, row_prompts, top_k)


def _merged_spans(rollouts, groups: dict[str, list[int]], parts: dict) -> SpanScores:
    """One SpanScores for all rows: token-level groups as one-token causal spans, K the largest group's."""
    mask = response_mask(rollouts)  # [N, T]
    device = rollouts.input_ids.device
    for name, rows in groups.items():
        if not isinstance(parts[name], SpanScores):
            parts[name] = SpanScores.tokens(parts[name].to(device), mask[torch.tensor(rows, device=mask.device)])
    num_spans = max(part.logprobs.shape[1] for part in parts.values())  # K
    count = mask.shape[0]
    logprobs = torch.zeros(count, num_spans, dtype=torch.float32, device=device)  # [N, K]
    span_ids = torch.zeros(mask.shape, dtype=torch.long, device=device)  # [N, T]
    span_mask = torch.zeros(count, num_spans, dtype=torch.bool, device=device)  # [N, K], False on padding
    causal = torch.zeros(count, dtype=torch.bool, device=device)  # [N]
    for name, rows in groups.items():
        index, part = torch.tensor(rows, device=device), parts[name]
        width = part.logprobs.shape[1]
        logprobs[index, :width] = part.logprobs.float().to(device)
        span_ids[index] = part.span_ids.to(device)
        span_mask[index, :width] = part.span_mask.to(device)
        causal[index] = part.causal.to(device)
    return SpanScores(logprobs, span_ids, span_mask, causal)


def _groups(routes: list[str | None]) -> dict[str, list[int]]:
    """teacher name -> the rows it scores, in order (None: the default teacher)."""
    groups: dict[str, list[int]] = {}
    for row, name in enumerate(routes):
        groups.setdefault(name or DEFAULT, []).append(row)
    return groups
