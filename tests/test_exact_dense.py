"""Exactness of the dense and top-k estimators and of the outcome reward mixed in, end to end.

Every response of a tiny Hugging Face student (variable lengths: EOS may end it after 1, 2 or 3 tokens) goes
through the trainer's own path (`optimize` with the local teacher's next-token distribution, the student's
chunked head), and the expected step is compared with the true gradient computed independently here by autograd
over every state the student can visit:

    J = sum_s reach(s) D(s)        D(s) = the divergence of the teacher from the student at state s

reach(s) (the probability that the student visits s) is differentiated for gamma = 1 and held fixed for
gamma = 0. For top-k, D is the divergence of the two distributions coarsened to the teacher's K likeliest tokens
plus one tail bucket. Student and teacher logits pass through float32 (the trainer's head), so "equal" is to
about 1e-6 relative.
"""

import itertools

import pytest
import torch

from opdplus.objective import Objective, get_divergence
from test_exact_end_to_end import PROMPT, expected_step, five, model, relative_error, responses, step_moments  # noqa: F401 (five: a fixture)


def coarsened(divergence, student_lp, teacher_lp, k):
    """D_f over the teacher's k likeliest tokens plus one tail bucket (k None: the whole vocabulary), in float64."""
    if k is None:
        return (student_lp.exp() * divergence.f(teacher_lp - student_lp)).sum()
    top = teacher_lp.topk(k).indices
    p, q = student_lp[top], teacher_lp[top]
    p_tail, q_tail = torch.log1p(-p.exp().sum()), torch.log1p(-q.exp().sum())
    terms = torch.cat([p, p_tail[None]]).exp() * divergence.f(torch.cat([q, q_tail[None]]) - torch.cat([p, p_tail[None]]))
    return terms.sum()


def state_gradient(student, teacher, vocab, max_new_tokens, divergence, gamma, k=None, reward=None,
                   reward_weight=0.0):
    """grad of sum_s reach(s) D(s) - reward_weight E[R], over the states before each response token."""
    divergence = get_divergence(divergence)
    eos = vocab - 1
    student.zero_grad()
    objective = 0.0
    for depth in range(max_new_tokens):
        for prefix in itertools.product(range(eos), repeat=depth):
            ids = torch.tensor([PROMPT + list(prefix)])
            student_lp = torch.log_softmax(student(ids).logits[0], -1)  # [len, V]
            with torch.no_grad():
                teacher_lp = torch.log_softmax(teacher(ids).logits[0, -1], -1)
            reach = student_lp[len(PROMPT) - 1 : -1].gather(1, ids[0, len(PROMPT):, None]).sum().exp()
            objective = objective + (reach if gamma == 1.0 else reach.detach()) * coarsened(
                divergence, student_lp[-1], teacher_lp, k)
    if reward is not None:
        for response in responses(vocab, max_new_tokens):
            ids = torch.tensor([PROMPT + response])
            logprob = torch.log_softmax(student(ids).logits[0, len(PROMPT) - 1 : -1], -1).gather(
                1, torch.tensor(response)[:, None]).sum()
            objective = objective - reward_weight * reward(response) * logprob.exp()
    objective.backward()
    gradient = torch.cat([p.grad.flatten() for p in student.parameters()])
    student.zero_grad()
    return gradient


@pytest.mark.parametrize("divergence", ["rkl", "fkl", "jsd", "chi2", "alpha:0.5"])
@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_dense_expected_step_is_the_true_gradient(five, divergence, gamma):
    student, teacher = five
    truth = state_gradient(student, teacher, 5, 3, divergence, gamma)
    dense = expected_step(student, teacher, 5, 3, 1, Objective(divergence, "dense", gamma=gamma))
    assert relative_error(dense, truth) < 1e-5


def test_dense_removes_the_sampling_noise_of_opd_plus(five):
    # the same expected step as sampled OPD+, and with gamma = 0 no randomness left at a visited state: its
    # second moment is that of the states alone
    student, teacher = five
    moments = {estimator: step_moments(student, teacher, 5, 3, Objective("fkl", estimator, log_ratio_clip=None))
               for estimator in ("opd+", "dense")}
    assert relative_error(moments["dense"][0], moments["opd+"][0]) < 1e-5
    variance = {name: second - float(mean.pow(2).sum()) for name, (mean, second) in moments.items()}
    print(f"total variance of one step (fkl, batch 1): opd+ {variance['opd+']:.3g}, dense {variance['dense']:.3g}")
    assert variance["dense"] < 0.5 * variance["opd+"]


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("divergence,gamma", [("fkl", 0.0), ("jsd", 1.0), ("hellinger", 0.0)])
def test_top_k_expected_step_is_the_true_gradient_of_the_coarsened_divergence(five, k, divergence, gamma):
    student, teacher = five
    truth = state_gradient(student, teacher, 5, 3, divergence, gamma, k=k)
    top = expected_step(student, teacher, 5, 3, 1, Objective(divergence, f"topk:{k}", gamma=gamma))
    assert relative_error(top, truth) < 1e-5
    full = state_gradient(student, teacher, 5, 3, divergence, gamma)
    assert relative_error(top, full) > 1e-3  # it is another objective: coarser than the whole divergence


@pytest.mark.parametrize("estimator", ["opd+", "dense"])
def test_outcome_reward_with_leave_one_out_baseline_is_unbiased(estimator):
    # vocabulary 3 (two tokens and EOS), 1-2 new tokens: 7 responses, batches of three samples of one prompt
    student, teacher = model(3, 0), model(3, 1)

    def reward(response):  # the "task": a response that starts with token 0
        return float(response[0] == 0)

    objective = Objective("fkl", estimator, gamma=1.0, reward_weight=0.7, log_ratio_clip=None)
    truth = state_gradient(student, teacher, 3, 2, "fkl", 1.0, reward=reward, reward_weight=0.7)
    mixed = expected_step(student, teacher, 3, 2, 3, objective, reward=reward, micro_batch_size=2)
    assert relative_error(mixed, truth) < 1e-5
    distillation_only = state_gradient(student, teacher, 3, 2, "fkl", 1.0)
    # the reward really moves the step: by far more than the rounding the exactness check allows
    assert relative_error(distillation_only, truth) > 1e3 * relative_error(mixed, truth)
