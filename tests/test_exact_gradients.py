"""Exact enumeration: a tabular autoregressive student over vocabulary 3 and length 3 and a random teacher,
every sequence enumerated in float64, so expectations over samples are exact sums and estimators can be
compared with the true gradient of the objective to ~1e-15."""

import itertools

import pytest
import torch

from opdplus import Divergence, get_divergence, opd_loss, token_advantages
from opdplus.tabular import TabularProblem, relative_error

PROBLEM = TabularProblem(vocab=3, length=3, seed=0)

JEFFREYS = Divergence.from_f(lambda u: (u - 1) * torch.log(u), "jeffreys")
SMOOTH = ["rkl", "fkl", "jsd", "jsd:0.2", "hellinger", "chi2", "neyman_chi2", "alpha:-1", "alpha:0.5",
          "alpha:2", JEFFREYS]
# alpha:0 is rkl + (u - 1) in the generator form used here: the same divergence, but its stop-gradient
# reward differs from rkl's by u - 1, which is not a constant, so "opd" is biased for it too.
BIASED_UNDER_OPD = ["fkl", "jsd", "jsd:0.2", "hellinger", "chi2", "neyman_chi2", "alpha:-1", "alpha:0.5",
                    "alpha:2", "alpha:0", JEFFREYS]


def test_state_weights_sum_to_one_per_depth():
    weights = PROBLEM.state_weights(PROBLEM.student)
    for depth in range(PROBLEM.length):
        rows = [PROBLEM.prefix_index(p) for p in itertools.product(range(PROBLEM.vocab), repeat=depth)]
        assert abs(float(weights[rows].sum()) - 1.0) < 1e-12


@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("divergence", SMOOTH, ids=str)
def test_opd_plus_is_the_exact_gradient(divergence, gamma):
    estimate = PROBLEM.expected_descent_direction(divergence, "opd+", gamma)
    assert relative_error(estimate, PROBLEM.true_gradient(divergence, gamma)) < 1e-8


@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("divergence", BIASED_UNDER_OPD, ids=str)
def test_stop_gradient_opd_is_biased(divergence, gamma):
    estimate = PROBLEM.expected_descent_direction(divergence, "opd", gamma)
    assert relative_error(estimate, PROBLEM.true_gradient(divergence, gamma)) > 0.1


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_stop_gradient_opd_is_exact_for_reverse_kl(gamma):
    estimate = PROBLEM.expected_descent_direction("rkl", "opd", gamma)
    assert relative_error(estimate, PROBLEM.true_gradient("rkl", gamma)) < 1e-8


def test_intermediate_gamma_discounts_by_unmasked_distance():
    # gamma in (0, 1): check the discounting against a direct double loop, with masked holes
    generator = torch.Generator().manual_seed(3)
    student = -torch.rand(2, 6, generator=generator, dtype=torch.float64) * 3
    teacher = -torch.rand(2, 6, generator=generator, dtype=torch.float64) * 3
    mask = torch.tensor([[1, 1, 0, 1, 1, 0], [1, 0, 0, 1, 1, 1]], dtype=torch.bool)
    divergence, gamma = get_divergence("jsd"), 0.7
    advantages = token_advantages(student, teacher, mask, divergence=divergence, gamma=gamma)
    log_ratio = teacher - student
    for b in range(2):
        for t in range(6):
            if not mask[b, t]:
                assert advantages[b, t] == 0
                continue
            expected, k = divergence.weight(log_ratio[b, t]), 0
            for later in range(t + 1, 6):
                if mask[b, later]:
                    k += 1
                    expected = expected + gamma**k * divergence.reward(log_ratio[b, later])
            assert abs(float(advantages[b, t] - expected)) < 1e-12


# ---------------------------------------------------------------------------------------- off-policy


def expected_loss_gradient(divergence, estimator: str, current: torch.Tensor, behavior: torch.Tensor) -> torch.Tensor:
    """sum_y p_old(y) grad_theta opd_loss(one sequence y): samples from the behavior policy, gradient at theta."""
    table = current.clone().requires_grad_(True)
    logprobs = PROBLEM.token_logprobs(table)
    behavior_logprobs = PROBLEM.token_logprobs(behavior)
    sample_probs = behavior_logprobs.sum(-1).exp()
    total = torch.zeros((), dtype=torch.float64)
    for i in range(len(PROBLEM.sequences)):
        row = slice(i, i + 1)
        loss, _ = opd_loss(logprobs[row], PROBLEM.teacher_logprobs[row], PROBLEM.mask[row], divergence=divergence,
                           estimator=estimator, behavior_logprobs=behavior_logprobs[row], reduction="sum")
        total = total + sample_probs[i] * loss
    total.backward()
    return table.grad


def off_policy_truth(divergence, current: torch.Tensor, behavior: torch.Tensor) -> torch.Tensor:
    table = current.clone().requires_grad_(True)
    PROBLEM.per_token_objective(table, behavior, get_divergence(divergence)).backward()  # states from theta_old
    return table.grad


CURRENT = PROBLEM.student + 0.3 * PROBLEM.random_table(seed=7)  # theta != theta_old


@pytest.mark.parametrize("divergence", SMOOTH, ids=str)
def test_off_policy_opd_plus_is_exact_at_the_current_policy(divergence):
    estimate = expected_loss_gradient(divergence, "opd+", CURRENT, PROBLEM.student)
    assert relative_error(estimate, off_policy_truth(divergence, CURRENT, PROBLEM.student)) < 1e-8


def test_off_policy_opd_is_biased_and_equals_on_policy_at_theta_old():
    estimate = expected_loss_gradient("fkl", "opd", CURRENT, PROBLEM.student)
    assert relative_error(estimate, off_policy_truth("fkl", CURRENT, PROBLEM.student)) > 0.1
    on_policy = PROBLEM.expected_descent_direction("fkl", "opd+", 0.0)
    via_loss = expected_loss_gradient("fkl", "opd+", PROBLEM.student, PROBLEM.student)
    assert relative_error(via_loss, on_policy) < 1e-10


# ---------------------------------------------------------------------------------- affine invariance


def test_adding_c_times_u_minus_one_shifts_the_weight_by_c_and_keeps_the_gradient():
    c = 0.7
    base = Divergence.from_f(lambda u: u * torch.log(u), "fkl-autograd")
    shifted = Divergence.from_f(lambda u: u * torch.log(u) + c * (u - 1), "fkl+c(u-1)")
    grid = torch.linspace(-5, 5, 401, dtype=torch.float64)
    torch.testing.assert_close(shifted.weight(grid) - base.weight(grid), torch.full_like(grid, c), rtol=0, atol=1e-12)
    torch.testing.assert_close(base.weight(grid), get_divergence("fkl").weight(grid), rtol=1e-12, atol=1e-12)
    for gamma in (0.0, 1.0):
        plus_base = PROBLEM.expected_descent_direction(base, "opd+", gamma)
        plus_shifted = PROBLEM.expected_descent_direction(shifted, "opd+", gamma)
        assert relative_error(plus_shifted, plus_base) < 1e-10
        opd_base = PROBLEM.expected_descent_direction(base, "opd", gamma)
        opd_shifted = PROBLEM.expected_descent_direction(shifted, "opd", gamma)
        assert relative_error(opd_shifted, opd_base) > 0.1


@pytest.mark.parametrize("divergence", ["rkl", "fkl", "alpha:2", JEFFREYS], ids=str)
def test_centering_the_weight_keeps_the_expected_gradient(divergence):
    divergence = get_divergence(divergence)
    table = PROBLEM.student.clone().requires_grad_(True)
    logprobs = PROBLEM.token_logprobs(table)
    plain = token_advantages(logprobs, PROBLEM.teacher_logprobs, PROBLEM.mask, divergence=divergence)
    centered = token_advantages(logprobs, PROBLEM.teacher_logprobs, PROBLEM.mask, divergence=divergence, center=True)
    shift = float(divergence.weight(torch.zeros((), dtype=torch.float64)))
    torch.testing.assert_close(plain - centered, torch.full_like(plain, shift))
    weights = logprobs.sum(-1).exp().detach()[:, None]
    (grad_plain,) = torch.autograd.grad((weights * plain * logprobs).sum(), table, retain_graph=True)
    (grad_centered,) = torch.autograd.grad((weights * centered * logprobs).sum(), table)
    assert relative_error(grad_centered, grad_plain) < 1e-10


# vocabulary 4: top-1 and top-2 leave a tail of several tokens; top-3 a tail of one (no coarsening at all)
WIDE = TabularProblem(vocab=4, length=3, seed=1)


@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("divergence", SMOOTH, ids=str)
def test_dense_is_the_exact_gradient(divergence, gamma):
    # the truth is written per token (gamma 0) or per sequence (gamma 1), not through position_divergences
    estimate = PROBLEM.expected_descent_direction(divergence, "dense", gamma)
    assert relative_error(estimate, PROBLEM.true_gradient(divergence, gamma)) < 1e-9


@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("divergence", ["rkl", "fkl", "jsd", "hellinger", "chi2", "alpha:0.5", JEFFREYS], ids=str)
@pytest.mark.parametrize("k", [1, 2])
def test_top_k_is_the_exact_gradient_of_the_coarsened_divergence(divergence, gamma, k):
    coarse = WIDE.true_gradient(divergence, gamma, top_k=k)
    assert relative_error(WIDE.expected_descent_direction(divergence, f"topk:{k}", gamma), coarse) < 1e-9
    assert relative_error(coarse, WIDE.true_gradient(divergence, gamma)) > 1e-3  # another, coarser objective


@pytest.mark.parametrize("gamma", [0.0, 1.0])
def test_a_tail_of_one_token_is_no_coarsening(gamma):
    # checks the state-wise truth used for top-k against the per-token / per-sequence one
    assert relative_error(WIDE.true_gradient("jsd", gamma, top_k=3), WIDE.true_gradient("jsd", gamma)) < 1e-12
    assert relative_error(WIDE.expected_descent_direction("jsd", "topk:3", gamma),
                          WIDE.true_gradient("jsd", gamma)) < 1e-9


@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("estimator", ["opd+", "dense", "topk:1"])
@pytest.mark.parametrize("divergence", ["rkl", "fkl", "jsd"])
def test_outcome_reward_with_leave_one_out_baseline_keeps_the_step_exact(divergence, estimator, gamma):
    top_k = 1 if estimator == "topk:1" else None
    truth = WIDE.true_gradient(divergence, gamma, top_k=top_k, reward_weight=0.5)
    step = WIDE.expected_descent_direction(divergence, estimator, gamma, reward_weight=0.5)
    assert relative_error(step, truth) < 1e-9
    assert relative_error(WIDE.true_gradient(divergence, gamma, top_k=top_k), truth) > 1e-2  # the reward counts


def test_exact_command_prints_every_estimator_against_its_truth(capsys):
    from opdplus.cli import main

    assert main(["exact", "--divergences", "rkl,fkl,jsd", "--vocab", "4", "--length", "2", "--top-k", "1,2",
                 "--reward-weight", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1]
    for column in ("opd", "opd+", "dense", "topk:1", "topk:1 vs D", "topk:2", "topk:2 vs D", "opd+ +λR", "dense +λR"):
        assert column in header
    rows = {(line.split()[0], float(line.split()[1])): [float(v) for v in line.split()[2:]] for line in lines[2:8]}
    assert set(rows) == {(name, gamma) for name in ("rkl", "fkl", "jsd") for gamma in (0.0, 1.0)}
    for (name, gamma), (opd, opd_cos, plus, dense, top1, top1_gap, top2, top2_gap, plus_r, dense_r) in rows.items():
        assert max(plus, dense, top1, top2, plus_r, dense_r) < 1e-9
        assert min(top1_gap, top2_gap) > 1e-2
        assert (opd < 1e-9) if name == "rkl" else (opd > 0.1)
    assert "leave-one-out" in "\n".join(lines[8:])


def test_exact_command_rejects_a_top_k_outside_the_vocabulary(capsys):
    from opdplus.cli import main

    assert main(["exact", "--vocab", "3", "--top-k", "3"]) != 0
    assert "--top-k" in capsys.readouterr().err
