"""A tabular autoregressive policy small enough to enumerate every sequence.

Vocabulary V, length L, one row of logits per prefix. Expectations over samples become exact sums, so the
expected step of every estimator (opd, opd+, dense, topk:K, each optionally with the outcome reward mixed in)
can be compared with the true gradient of its objective to float64 precision. The truths are computed here by
autograd on the objectives written out directly, not through the estimators' code.
Used by the tests and by `opdplus exact`, which prints how far each estimator is from the truth.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from opdplus.objective.advantages import discounted_future_sum, token_advantages
from opdplus.objective.dense import position_divergences
from opdplus.objective.divergences import Divergence, get_divergence
from opdplus.objective.rewards import leave_one_out_advantages


class TabularProblem:
    """All sequences of a length-L, vocabulary-V autoregressive model; a teacher table is fixed."""

    def __init__(self, vocab: int = 3, length: int = 3, seed: int = 0, scale: float = 1.5):
        self.vocab, self.length = vocab, length
        self.sequences = torch.tensor(list(itertools.product(range(vocab), repeat=length)))  # [V^L, L]
        self.num_prefixes = sum(vocab**k for k in range(length))
        self.states = torch.tensor(
            [[self.prefix_index(tuple(seq[:t])) for t in range(length)] for seq in self.sequences.tolist()]
        )  # [V^L, L]: row of the logits table used at each position
        self.student = self.random_table(seed, scale)
        self.teacher_table_logprobs = torch.log_softmax(self.random_table(seed + 1, scale), -1)
        self.teacher_logprobs = self.teacher_table_logprobs[self.states, self.sequences]
        self.mask = torch.ones(len(self.sequences), length, dtype=torch.bool)
        # the task's outcome reward of each sequence: a fixed 0/1 verdict drawn from the seed
        self.rewards = (torch.rand(len(self.sequences), generator=torch.Generator().manual_seed(seed + 2),
                                   dtype=torch.float64) < 0.5).double()

    def prefix_index(self, prefix: tuple[int, ...]) -> int:
        """Prefixes of length 0, 1, ..., L-1 laid out one block after another."""
        offset = sum(self.vocab**k for k in range(len(prefix)))
        return offset + sum(token * self.vocab ** (len(prefix) - 1 - i) for i, token in enumerate(prefix))

    def random_table(self, seed: int, scale: float = 1.0) -> Tensor:
        generator = torch.Generator().manual_seed(seed)
        return scale * torch.randn(self.num_prefixes, self.vocab, generator=generator, dtype=torch.float64)

    def token_logprobs(self, table: Tensor) -> Tensor:
        """log p(y_t | y_<t) for every enumerated sequence: [V^L, L]."""
        return torch.log_softmax(table, -1)[self.states, self.sequences]

    def state_weights(self, table: Tensor) -> Tensor:
        """Probability of reaching each prefix under the detached policy: [num_prefixes]; sums to 1 per depth."""
        return self.reach(table.detach())

    def reach(self, table: Tensor) -> Tensor:
        """Probability of reaching each prefix, differentiable in the table: [num_prefixes]."""
        logprobs = torch.log_softmax(table, -1)
        weights = []  # itertools.product runs through each depth's prefixes in prefix_index order
        for depth in range(self.length):
            for prefix in itertools.product(range(self.vocab), repeat=depth):
                rows = [self.prefix_index(prefix[:t]) for t in range(depth)]
                weights.append(logprobs[rows, list(prefix)].sum().exp())
        return torch.stack(weights)

    def coarsened_divergence(self, table: Tensor, divergence: Divergence, top_k: int | None) -> Tensor:
        """[num_prefixes] D_f(q || p_theta) at every state, over the whole vocabulary (top_k None) or over the
        teacher's top_k likeliest tokens plus one bucket holding the rest of each distribution's mass."""
        student, teacher = torch.log_softmax(table, -1), self.teacher_table_logprobs
        if top_k is not None:
            top = teacher.topk(top_k, -1).indices
            student_top, teacher_top = student.gather(-1, top), teacher.gather(-1, top)
            student = torch.cat([student_top, torch.log1p(-student_top.exp().sum(-1, keepdim=True))], -1)
            teacher = torch.cat([teacher_top, torch.log1p(-teacher_top.exp().sum(-1, keepdim=True))], -1)
        return (student.exp() * divergence.f(teacher - student)).sum(-1)

    def check_top_k(self, top_k: int | None) -> int | None:
        if top_k is not None and not 1 <= top_k < self.vocab:
            raise ValueError(f"top-k must be between 1 and vocab - 1 = {self.vocab - 1}, got {top_k}")
        return top_k

    def per_token_objective(self, table: Tensor, frozen: Tensor, divergence: Divergence) -> Tensor:
        """J = sum_s d_frozen(s) D_f(q(.|s) || p_theta(.|s)): the gamma = 0 objective, states held fixed."""
        student = torch.log_softmax(table, -1)
        per_state = (student.exp() * divergence.f(self.teacher_table_logprobs - student)).sum(-1)
        return (self.state_weights(frozen) * per_state).sum()

    def sequence_objective(self, table: Tensor, divergence: Divergence) -> Tensor:
        """J = E_{y ~ p_theta}[sum_t f(u_t)]: the gamma = 1 objective."""
        logprobs = self.token_logprobs(table)
        return (logprobs.sum(-1).exp() * divergence.f(self.teacher_logprobs - logprobs).sum(-1)).sum()

    def true_gradient(self, divergence: str | Divergence, gamma: float, top_k: int | None = None,
                      reward_weight: float = 0.0) -> Tensor:
        """Gradient of the objective that gamma selects, at the student table (gamma in {0, 1}), minus
        reward_weight * grad E[R]. With top_k the divergence at each state is the coarsened one (the teacher's
        top_k tokens plus a tail bucket) and the objective is sum_s reach(s) D_K(s), reach held fixed for
        gamma = 0; without it the whole-vocabulary objectives are written per token and per sequence."""
        divergence = get_divergence(divergence)
        table = self.student.clone().requires_grad_(True)
        if gamma not in (0.0, 1.0):
            raise ValueError(f"gamma must be 0 or 1 for an exact objective, got {gamma}")
        if self.check_top_k(top_k) is not None:
            reach = self.reach(table if gamma == 1.0 else self.student)
            objective = (reach * self.coarsened_divergence(table, divergence, top_k)).sum()
        elif gamma == 0.0:
            objective = self.per_token_objective(table, self.student, divergence)
        else:
            objective = self.sequence_objective(table, divergence)
        if reward_weight:
            objective = objective - reward_weight * (self.token_logprobs(table).sum(-1).exp() * self.rewards).sum()
        objective.backward()
        return table.grad

    def expected_descent_direction(self, divergence: str | Divergence, estimator: str, gamma: float,
                                   reward_weight: float = 0.0) -> Tensor:
        """-sum_y p(y) sum_t A_t grad log p(y_t | s_t): what a policy-gradient step follows on average, as a
        gradient of the objective (so it equals `true_gradient` for an unbiased estimator).

        estimator "opd" / "opd+" sample the token at each state; "dense" / "topk:K" differentiate the per-state
        divergence (objective/dense.py `position_divergences`) and use later states' divergences as rewards
        (gamma), as objective/loss.py does with `divergences=`."""
        table = self.student.clone().requires_grad_(True)
        logprobs = self.token_logprobs(table)
        sequence_probs = logprobs.sum(-1).exp().detach()
        if estimator == "dense" or estimator.startswith("topk:"):
            divergences = self.position_divergences(table, get_divergence(divergence), estimator)  # [V^L, L]
            advantages = discounted_future_sum(-divergences.detach(), self.mask, gamma)
            loss = (sequence_probs[:, None] * (divergences - advantages * logprobs)).sum()
        else:
            advantages = token_advantages(logprobs, self.teacher_logprobs, self.mask, divergence=divergence,
                                          estimator=estimator, gamma=gamma)
            loss = -(sequence_probs[:, None] * advantages * logprobs).sum()
        if reward_weight:
            loss = loss + reward_weight * self.reward_loss(logprobs)
        loss.backward()
        return table.grad

    def position_divergences(self, table: Tensor, divergence: Divergence, estimator: str) -> Tensor:
        """[V^L, L] the dense or top-k per-position divergence the trainer's loss differentiates."""
        student = torch.log_softmax(table, -1)
        if estimator == "dense":
            per_state = position_divergences(divergence, student, self.teacher_table_logprobs)
        else:
            top_k = self.check_top_k(int(estimator.split(":", 1)[1]))
            teacher, token_ids = self.teacher_table_logprobs.topk(top_k, -1)
            per_state = position_divergences(divergence, student, teacher, token_ids)
        return per_state[self.states]

    def reward_loss(self, logprobs: Tensor, chunk: int = 256) -> Tensor:
        """The expected outcome-reward loss -E[A_i log p(y_i)] of a group of two samples of the prompt, A_i =
        R_i - the leave-one-out baseline (the other sample's reward), averaged over the group, with every pair
        of sequences enumerated. The baseline leaves the expectation at E[R grad log p] = grad E[R]."""
        sequence_logprobs = logprobs.sum(-1)  # [V^L]
        probs = sequence_logprobs.detach().exp()
        count, total = len(probs), torch.zeros((), dtype=torch.float64)
        for start in range(0, count, chunk):
            first = torch.arange(start, min(start + chunk, count))[:, None].expand(-1, count)  # [c, V^L]
            second = torch.arange(count)[None, :].expand_as(first)
            pairs = torch.stack([first, second], -1).reshape(-1, 2)  # [c * V^L, 2] sequence ids
            groups = torch.arange(len(pairs))[:, None].expand(-1, 2).reshape(-1)
            advantages = leave_one_out_advantages(self.rewards[pairs.reshape(-1)], groups).view(-1, 2)
            pair_probs = probs[pairs].prod(-1)  # [c * V^L]
            total = total - (pair_probs[:, None] * advantages * sequence_logprobs[pairs]).sum() / 2
        return total


def relative_error(estimate: Tensor, truth: Tensor) -> float:
    return float((estimate - truth).norm() / truth.norm())


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
