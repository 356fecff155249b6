"""opd_loss mechanics: reductions, micro-batch invariance, PPO clipping, metrics and input validation."""

import math

import pytest
import torch

from opdplus import opd_loss, token_advantages


def batch(seed=0, rows=4, length=7, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    student = -torch.rand(rows, length, generator=generator, dtype=dtype) * 3
    teacher = -torch.rand(rows, length, generator=generator, dtype=dtype) * 3
    lengths = torch.tensor([7, 5, 2, 6])[:rows]
    mask = torch.arange(length)[None, :] < lengths[:, None]
    return student, teacher, mask


def gradient(loss_fn, student):
    logprobs = student.clone().requires_grad_(True)
    loss_fn(logprobs).backward()
    return logprobs.grad


def test_on_policy_loss_is_minus_advantage_times_logprob():
    student, teacher, mask = batch()
    advantages = token_advantages(student, teacher, mask, divergence="jsd", gamma=0.5)
    grad = gradient(lambda lp: opd_loss(lp, teacher, mask, divergence="jsd", gamma=0.5, reduction="sum")[0], student)
    torch.testing.assert_close(grad, -advantages)
    default = gradient(lambda lp: opd_loss(lp, teacher, mask, divergence="jsd", gamma=0.5)[0], student)
    torch.testing.assert_close(default, -advantages / mask.shape[0])  # sequence-sum: divided by the sequences
    token_mean = gradient(lambda lp: opd_loss(lp, teacher, mask, divergence="jsd", gamma=0.5,
                                              reduction="token-mean")[0], student)
    torch.testing.assert_close(token_mean, -advantages / mask.sum())


@pytest.mark.parametrize("reduction,count", [("sequence-sum", "num_sequences"), ("token-mean", "num_tokens")])
def test_global_counts_make_the_loss_invariant_to_micro_batching(reduction, count):
    student, teacher, mask = batch()
    full = gradient(lambda lp: opd_loss(lp, teacher, mask, divergence="fkl", reduction=reduction)[0], student)
    total = {"num_sequences": mask.shape[0], "num_tokens": int(mask.sum())}[count]

    def split_loss(lp):
        # two micro-batches of unequal sizes, each normalized by the global count, summed
        first, _ = opd_loss(lp[:1], teacher[:1], mask[:1], divergence="fkl", reduction=reduction, **{count: total})
        second, _ = opd_loss(lp[1:], teacher[1:], mask[1:], divergence="fkl", reduction=reduction, **{count: total})
        return first + second

    torch.testing.assert_close(gradient(split_loss, student), full)
    # while a per-micro-batch normalisation gives a different (wrong) answer
    naive = gradient(lambda lp: 0.5 * (opd_loss(lp[:1], teacher[:1], mask[:1], divergence="fkl", reduction=reduction)[0]
                                       + opd_loss(lp[1:], teacher[1:], mask[1:], divergence="fkl",
                                                  reduction=reduction)[0]), student)
    assert not torch.allclose(naive, full)


def test_sequence_mean_averages_per_sequence_means():
    student, teacher, mask = batch()
    advantages = token_advantages(student, teacher, mask, divergence="rkl")
    grad = gradient(lambda lp: opd_loss(lp, teacher, mask, divergence="rkl", reduction="sequence-mean")[0], student)
    expected = -advantages / mask.sum(-1, keepdim=True) / mask.shape[0]
    torch.testing.assert_close(grad, expected)


def test_masked_positions_get_no_gradient_even_with_garbage_values():
    student, teacher, mask = batch()
    student = torch.where(mask, student, torch.nan)
    teacher = torch.where(mask, teacher, torch.inf)
    grad = gradient(lambda lp: opd_loss(lp, teacher, mask, divergence="chi2", log_ratio_clip=5.0)[0], student)
    assert torch.isfinite(grad).all()
    assert (grad[~mask] == 0).all()


def test_off_policy_ppo_clip():
    student, teacher, mask = batch()
    behavior = student - 0.5 * torch.sign(torch.randn_like(student))  # ratios e^{+-0.5}, far outside 1 +- 0.2
    advantages = token_advantages(student, teacher, mask, divergence="jsd")

    def loss_fn(lp):
        return opd_loss(lp, teacher, mask, divergence="jsd", behavior_logprobs=behavior, clip_eps=0.2,
                        reduction="sum")[0]

    grad = gradient(loss_fn, student)
    ratio = torch.exp(student - behavior)
    clipped = ((advantages > 0) & (ratio > 1.2)) | ((advantages < 0) & (ratio < 0.8))
    # clipped tokens get no gradient, the others -rho * A
    torch.testing.assert_close(grad, torch.where(clipped | ~mask, 0.0, -ratio * advantages))
    _, metrics = opd_loss(student, teacher, mask, divergence="jsd", behavior_logprobs=behavior, clip_eps=0.2)
    assert math.isclose(metrics["ppo_clip_fraction"], float(clipped[mask].double().mean()), rel_tol=1e-9)


def test_opd_uses_behavior_reward_and_opd_plus_the_current_weight():
    student, teacher, mask = batch()
    behavior = student + 0.3
    for estimator, policy in (("opd", behavior), ("opd+", student)):
        advantages = token_advantages(policy, teacher, mask, divergence="hellinger", estimator=estimator)
        grad = gradient(lambda lp: opd_loss(lp, teacher, mask, divergence="hellinger", estimator=estimator,
                                            behavior_logprobs=behavior, reduction="sum")[0], student)
        torch.testing.assert_close(grad, -torch.exp(student - behavior) * advantages * mask)


def test_metrics_are_plain_floats_and_correct():
    student, teacher, mask = batch()
    loss, metrics = opd_loss(student, teacher, mask, divergence="rkl", log_ratio_clip=1.0)
    assert all(type(value) is float for value in metrics.values())
    log_ratio = (teacher - student)[mask]
    assert math.isclose(metrics["log_ratio_mean"], float(log_ratio.mean()), rel_tol=1e-9)
    assert math.isclose(metrics["reverse_kl"], -float(log_ratio.mean()), rel_tol=1e-9)
    assert math.isclose(metrics["log_ratio_clip_fraction"], float((log_ratio.abs() > 1.0).double().mean()))
    assert math.isclose(metrics["divergence"], -float(log_ratio.clamp(-1, 1).mean()), rel_tol=1e-9)
    assert metrics["num_tokens"] == float(mask.sum())
    assert metrics["loss"] == float(loss)


def test_mask_may_be_zero_one_integers():
    student, teacher, mask = batch()
    a = token_advantages(student, teacher, mask, divergence="fkl")
    b = token_advantages(student, teacher, mask.long(), divergence="fkl")
    torch.testing.assert_close(a, b)


BAD_CALLS = [
    (dict(teacher_logprobs=torch.zeros(4, 6)), "teacher_logprobs has shape"),
    (dict(mask=torch.ones(4, 6)), "student_logprobs has shape"),
    (dict(mask=torch.ones(4, 7, 1)), "mask must have shape"),
    (dict(mask=torch.full((4, 7), 2)), "mask must be bool or hold only 0 and 1"),
    (dict(student_logprobs=torch.full((4, 7), math.nan)), "student_logprobs holds NaN"),
    (dict(teacher_logprobs=torch.full((4, 7), math.inf)), "teacher_logprobs holds NaN or inf"),
    (dict(divergence="kl"), "unknown divergence 'kl'"),
    (dict(divergence="jsd:1.2"), "beta must be in \\(0, 1\\)"),
    (dict(gamma=1.5), "gamma must be in \\[0, 1\\]"),
    (dict(gamma=-0.1), "gamma must be in \\[0, 1\\]"),
    (dict(estimator="ppo"), "estimator must be one of opd, opd\\+"),
    (dict(log_ratio_clip=0.0), "log_ratio_clip must be positive"),
]


@pytest.mark.parametrize("override,message", BAD_CALLS)
def test_token_advantages_rejects_bad_input(override, message):
    student, teacher, mask = batch(dtype=torch.float32)
    arguments = dict(student_logprobs=student, teacher_logprobs=teacher, mask=mask, divergence="fkl")
    arguments.update(override)
    with pytest.raises(ValueError, match=message):
        token_advantages(**arguments)


@pytest.mark.parametrize("override,message", [
    (dict(reduction="mean"), "reduction must be one of sequence-sum, token-mean, sequence-mean, sum"),
    (dict(clip_eps=-0.2), "clip_eps must be positive"),
    (dict(num_tokens=0), "num_tokens must be positive"),
    (dict(num_sequences=0), "num_sequences must be positive"),
    (dict(behavior_logprobs=torch.zeros(3, 7)), "behavior_logprobs has shape"),
    (dict(gamma=2.0), "gamma must be in"),
])
def test_opd_loss_rejects_bad_input(override, message):
    student, teacher, mask = batch(dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        opd_loss(student, teacher, mask, divergence="jsd", **override)
