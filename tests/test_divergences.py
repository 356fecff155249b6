"""Closed forms against the generators as written in u, autograd weights, limits and numerics."""

import math

import mpmath
import pytest
import torch

from opdplus import Divergence, get_divergence, token_advantages

# The generators exactly as the literature writes them, in u (independent of the closed forms in l).
GENERATORS = {
    "rkl": lambda u: -torch.log(u),
    "fkl": lambda u: u * torch.log(u),
    "jsd": lambda u: 0.5 * u * torch.log(u) - (0.5 * u + 0.5) * torch.log(0.5 * u + 0.5),
    "jsd:0.2": lambda u: 0.2 * u * torch.log(u) - (0.2 * u + 0.8) * torch.log(0.2 * u + 0.8),
    "tv": lambda u: 0.5 * (u - 1).abs(),
    "hellinger": lambda u: (torch.sqrt(u) - 1) ** 2,
    "chi2": lambda u: (u - 1) ** 2,
    "neyman_chi2": lambda u: (1 - u) ** 2 / u,
}
for _a in (-1.5, 0.5, 2.0, 3.0):
    GENERATORS[f"alpha:{_a:g}"] = lambda u, a=_a: (u**a - a * u - (1 - a)) / (a * (a - 1))

# The paper's closed-form weights, u = e^l.
CLOSED_WEIGHTS = {
    "rkl": lambda l: l - 1,
    "fkl": torch.exp,
    "jsd": lambda l: 0.5 * torch.log((1 + torch.exp(l)) / 2),
    "hellinger": lambda l: torch.exp(l / 2) - 1,
    "chi2": lambda l: torch.exp(2 * l) - 1,
    "alpha:0.5": lambda l: (torch.exp(0.5 * l) - 1) / 0.5,
    "tv": lambda l: 0.5 * torch.sign(torch.exp(l) - 1),
}

GRID = torch.linspace(-20, 20, 2001, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_closed_form_weight_equals_autograd_weight(name):
    closed = get_divergence(name)
    from_f = Divergence.from_f(GENERATORS[name], name)
    # -f + u f' cancels two terms of size ~u|l| when w stays small (jsd, neyman, alpha < 0 at large l):
    # float64 autograd then loses digits the closed form keeps, so the bound is 1e-10 relative to the
    # size of the cancelled terms (1e-10 relative to w itself wherever they are of the size of w).
    u = torch.exp(GRID).requires_grad_(True)
    f_u = GENERATORS[name](u)
    (df_du,) = torch.autograd.grad(f_u.sum(), u)
    term_scale = 1.0 + f_u.detach().abs() + (u * df_du).detach().abs()
    difference = (closed.weight(GRID) - from_f.weight(GRID)).abs()
    assert (difference <= 1e-10 * term_scale).all(), float((difference / term_scale).max())


def _mp_weight(generator, log_ratio: float) -> float:
    """-f(u) + u f'(u) with 60-digit arithmetic: the ground truth both forms are compared with."""
    with mpmath.workdps(60):
        u = mpmath.exp(mpmath.mpf(log_ratio))
        return float(-generator(u) + u * mpmath.diff(generator, u))


MP_GENERATORS = {
    "fkl": lambda u: u * mpmath.log(u),
    "jsd": lambda u: u / 2 * mpmath.log(u) - (u / 2 + mpmath.mpf(1) / 2) * mpmath.log(u / 2 + mpmath.mpf(1) / 2),
    "jsd:0.2": lambda u: mpmath.mpf("0.2") * u * mpmath.log(u)
    - (mpmath.mpf("0.2") * u + mpmath.mpf("0.8")) * mpmath.log(mpmath.mpf("0.2") * u + mpmath.mpf("0.8")),
    "neyman_chi2": lambda u: (1 - u) ** 2 / u,
    "alpha:-1.5": lambda u: (u ** mpmath.mpf(-1.5) + mpmath.mpf(1.5) * u - mpmath.mpf(2.5)) / mpmath.mpf(3.75),
}


@pytest.mark.parametrize("name", sorted(MP_GENERATORS))
def test_closed_form_weight_matches_high_precision_truth(name):
    log_ratio = torch.linspace(-20, 20, 81, dtype=torch.float64)
    truth = torch.tensor([_mp_weight(MP_GENERATORS[name], float(x)) for x in log_ratio], dtype=torch.float64)
    torch.testing.assert_close(get_divergence(name).weight(log_ratio), truth, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_closed_form_f_equals_generator(name):
    # the literal u-space forms lose digits to cancellation, so this is looser than the weight check
    literal = GENERATORS[name](torch.exp(GRID))
    torch.testing.assert_close(get_divergence(name).f(GRID), literal, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", sorted(CLOSED_WEIGHTS))
def test_weights_match_the_papers_closed_forms(name):
    torch.testing.assert_close(get_divergence(name).weight(GRID), CLOSED_WEIGHTS[name](GRID), rtol=1e-12, atol=1e-12)


def test_reward_is_minus_f_and_f_vanishes_at_u_equal_one():
    zero = torch.zeros(3, dtype=torch.float64)
    for name in list(GENERATORS) + ["alpha:0", "alpha:1"]:
        divergence = get_divergence(name)
        torch.testing.assert_close(divergence.reward(GRID), -divergence.f(GRID))
        assert divergence.f(zero).abs().max() == 0.0, name


@pytest.mark.parametrize("a", [0.0, 1e-12, -1e-9, 1.0, 1.0 + 1e-12, 1.0 - 1e-9])
def test_alpha_limits_are_rkl_and_fkl_without_dividing_by_zero(a):
    divergence = get_divergence(f"alpha:{a!r}")
    u = torch.exp(GRID)
    if abs(a) < 0.5:  # alpha -> 0: rkl + (u - 1), weight l
        expected_f, expected_w = -GRID + (u - 1), GRID
    else:  # alpha -> 1: fkl - (u - 1), weight u - 1
        expected_f, expected_w = u * GRID - (u - 1), u - 1
    f, w = divergence.f(GRID), divergence.weight(GRID)
    assert torch.isfinite(f).all() and torch.isfinite(w).all()
    torch.testing.assert_close(f, expected_f, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(w, expected_w, rtol=1e-6, atol=1e-6)


NUMERIC_NAMES = ["rkl", "fkl", "jsd", "jsd:0.05", "jsd:0.95", "tv", "hellinger", "chi2", "neyman_chi2",
                 "alpha:-2", "alpha:0", "alpha:0.5", "alpha:1", "alpha:3"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NUMERIC_NAMES)
def test_no_overflow_for_log_ratios_up_to_50(name, dtype):
    divergence = get_divergence(name)
    clip = divergence.safe_log_ratio if divergence.safe_log_ratio is not None and divergence.safe_log_ratio < 50 else None
    log_ratio = torch.linspace(-50, 50, 1001).to(dtype)
    if clip is not None:
        log_ratio = log_ratio.clamp(-clip, clip)
    for values in (divergence.f(log_ratio), divergence.weight(log_ratio)):
        assert values.dtype == dtype
        assert torch.isfinite(values).all(), name
    # and the same through token_advantages with the documented clip
    student = torch.zeros(2, 501, dtype=dtype)
    teacher = torch.linspace(-50, 50, 1002).to(dtype).reshape(2, 501)
    for estimator in ("opd", "opd+"):
        advantages = token_advantages(student, teacher, torch.ones(2, 501), divergence=divergence,
                                      estimator=estimator, gamma=0.0, log_ratio_clip=clip)
        assert torch.isfinite(advantages).all(), (name, estimator)


def test_unbounded_weights_declare_a_safe_range():
    assert get_divergence("chi2").safe_log_ratio == 40.0
    assert get_divergence("rkl").safe_log_ratio is None and get_divergence("tv").safe_log_ratio is None
    # beyond the declared range float32 does overflow: the clip is needed, not decorative
    assert not torch.isfinite(get_divergence("chi2").weight(torch.tensor([50.0]))).all()


def test_parsing_and_errors():
    assert get_divergence("JSD").name == "jsd"
    assert get_divergence("jsd:0.3").name == "jsd:0.3"
    assert get_divergence("alpha:-1").name == "alpha:-1"
    divergence = get_divergence("fkl")
    assert get_divergence(divergence) is divergence
    with pytest.raises(ValueError, match="unknown divergence 'kl2'.*valid: rkl, fkl"):
        get_divergence("kl2")
    for bad in ("jsd:0", "jsd:1", "jsd:1.5", "jsd:-0.1"):
        with pytest.raises(ValueError, match="beta must be in \\(0, 1\\)"):
            get_divergence(bad)
    with pytest.raises(ValueError, match="not a number"):
        get_divergence("alpha:x")
    with pytest.raises(ValueError, match="not a number"):
        get_divergence("jsd:abc")


def test_from_f_rejects_invalid_generators():
    with pytest.raises(ValueError, match="f\\(1\\) must be 0"):
        Divergence.from_f(lambda u: u * torch.log(u) + 1.0, "shifted")
    with pytest.raises(ValueError, match="must be convex"):
        Divergence.from_f(lambda u: torch.log(u), "concave")
    with pytest.raises(ValueError, match="must be convex"):
        Divergence.from_f(lambda u: torch.sin(u - 1), "wiggly")
    with pytest.raises(ValueError, match="failed"):
        Divergence.from_f(lambda u: u.not_a_method(), "broken")


def test_from_f_weight_of_jeffreys():
    jeffreys = Divergence.from_f(lambda u: (u - 1) * torch.log(u), "jeffreys")
    u = torch.exp(GRID)
    # f' = log u + (u - 1)/u, so -f + u f' = -(u - 1) l + u l + u - 1 = l + u - 1
    expected = GRID + u - 1
    torch.testing.assert_close(jeffreys.weight(GRID), expected, rtol=1e-10, atol=1e-10)
    assert math.isclose(float(jeffreys.f(torch.zeros((), dtype=torch.float64))), 0.0)
