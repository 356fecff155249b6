"""The per-position divergence over the vocabulary, for the dense and top-k estimators.

At a visited state s the sampled estimators see one token y ~ p_theta(.|s) and weight its score by w_f(u). The
dense estimator sums over every token instead:

    D(s) = sum_y p_theta(y|s) f(q(y|s) / p_theta(y|s))         differentiated directly: no sampling noise at s

Its gradient is E_y[-w_f(u) grad log p_theta(y|s)] (the OPD+ weight is exactly that expectation), so dense and
sampled OPD+ have the same expected step; dense is OPD+ Rao-Blackwellised over the token at each position.

Top-k keeps the teacher's K most likely tokens at s and pools everything else into one tail bucket, for both
models: D_K(s) = sum_{y in S} p f(q / p) + p_tail f(q_tail / p_tail). Because S depends on the teacher only,
this is the exact gradient of that coarsened divergence, which by the data-processing inequality is at most
D(s) (docs/theory.md, "Dense and top-k"). The same tail bucket absorbs token ids that only one model has (a
student and a teacher whose embedding matrices are padded to different sizes).
"""

from __future__ import annotations

import torch
from torch import Tensor

from opdplus.objective.divergences import Divergence


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - e^x) for x <= 0, accurate at both ends; clamped at -700 so that an empty bucket gives a
    negligible term instead of 0 * inf."""
    x = x.clamp(max=-1e-300)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x))).clamp(min=-700.0)


def position_divergences(divergence: Divergence, student_logprobs: Tensor, teacher_logprobs: Tensor,
                         token_ids: Tensor | None = None) -> Tensor:
    """[M]: the divergence of the teacher from the student at each of M positions, over a set of tokens plus a
    tail bucket.

    student_logprobs: [M, V_s] log-softmax of the student's logits (carrying the gradient);
    teacher_logprobs: [M, K] the teacher's log-probs of `token_ids` [M, K] (top-k), or, with token_ids None,
    of the ids 0 .. K-1 (dense: K is the teacher's vocabulary size). The tokens outside the set form one bucket
    with the rest of each model's mass; when both models cover the same ids completely there is none."""
    if token_ids is None:
        common = min(student_logprobs.shape[-1], teacher_logprobs.shape[-1])
        student_set, teacher_set = student_logprobs[:, :common], teacher_logprobs[:, :common]
        has_tail = student_logprobs.shape[-1] != teacher_logprobs.shape[-1]
    else:
        student_set, teacher_set = student_logprobs.gather(-1, token_ids), teacher_logprobs
        has_tail = True
    total = divergence.perspective(student_set, teacher_set).sum(-1)  # [M]
    if has_tail:  # the rest of each distribution's mass, in float64: 1 - (a sum close to 1) loses digits
        student_tail = log1mexp(torch.logsumexp(student_set.double(), -1))
        teacher_tail = log1mexp(torch.logsumexp(teacher_set.double(), -1))
        total = total + divergence.perspective(student_tail, teacher_tail).to(total.dtype)
    return total
