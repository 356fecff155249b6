"""A tabular autoregressive policy small enough to enumerate every sequence.

Vocabulary V, length L, one row of logits per prefix. Expectations over samples become exact sums, so the
expected OPD / OPD+ gradient can be compared with the true gradient of the objective to float64 precision.
Used by the tests and by `opdplus exact`, which prints how far each estimator is from the truth.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from opdplus.objective.advantages import token_advantages
from opdplus.objective.divergences import Divergence, get_divergence


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
        logprobs = torch.log_softmax(table.detach(), -1)
        weights = torch.zeros(self.num_prefixes, dtype=torch.float64)
        for depth in range(self.length):
            for prefix in itertools.product(range(self.vocab), repeat=depth):
                rows = [self.prefix_index(prefix[:t]) for t in range(depth)]
                weights[self.prefix_index(prefix)] = logprobs[rows, list(prefix)].sum().exp()
        return weights

    def per_token_objective(self, table: Tensor, frozen: Tensor, divergence: Divergence) -> Tensor:
        """J = sum_s d_frozen(s) D_f(q(.|s) || p_theta(.|s)): the gamma = 0 objective, states held fixed."""
        student = torch.log_softmax(table, -1)
        per_state = (student.exp() * divergence.f(self.teacher_table_logprobs - student)).sum(-1)
        return (self.state_weights(frozen) * per_state).sum()

    def sequence_objective(self, table: Tensor, divergence: Divergence) -> Tensor:
        """J = E_{y ~ p_theta}[sum_t f(u_t)]: the gamma = 1 objective."""
        logprobs = self.token_logprobs(table)
        return (logprobs.sum(-1).exp() * divergence.f(self.teacher_logprobs - logprobs).sum(-1)).sum()

    def true_gradient(self, divergence: str | Divergence, gamma: float) -> Tensor:
        """Gradient of the objective that gamma selects, at the student table (gamma in {0, 1})."""
        divergence = get_divergence(divergence)
        table = self.student.clone().requires_grad_(True)
        if gamma == 0.0:
            objective = self.per_token_objective(table, self.student, divergence)
        elif gamma == 1.0:
            objective = self.sequence_objective(table, divergence)
        else:
            raise ValueError(f"gamma must be 0 or 1 for an exact objective, got {gamma}")
        objective.backward()
        return table.grad

    def expected_descent_direction(self, divergence: str | Divergence, estimator: str, gamma: float) -> Tensor:
        """-sum_y p(y) sum_t A_t grad log p(y_t | s_t): what a policy-gradient step follows on average, as a
        gradient of the objective (so it equals `true_gradient` for an unbiased estimator)."""
        table = self.student.clone().requires_grad_(True)
        logprobs = self.token_logprobs(table)
        advantages = token_advantages(logprobs, self.teacher_logprobs, self.mask, divergence=divergence,
                                      estimator=estimator, gamma=gamma)
        sequence_probs = logprobs.sum(-1).exp().detach()
        (-(sequence_probs[:, None] * advantages * logprobs).sum()).backward()
        return table.grad


def relative_error(estimate: Tensor, truth: Tensor) -> float:
    return float((estimate - truth).norm() / truth.norm())


def cosine(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))
