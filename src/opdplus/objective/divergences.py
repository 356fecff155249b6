"""f-divergences D_f(q || p) = E_{y~p}[f(q(y)/p(y))] written in the log-ratio l = log q - log p.

Everything an OPD estimator needs from a divergence is two per-token numbers:

    reward(l) = -f(u)               the stop-gradient reward used by classic OPD ("opd")
    weight(l) = -f(u) + u f'(u)     the exact policy-gradient weight ("opd+")

with u = exp(l). The second carries the term that stop-gradient OPD drops: u depends on the student,
so d/dtheta f(q/p_theta) = -u f'(u) dlog p_theta. See docs/theory.md for the derivation.

Built-ins are closed forms in l (expm1, logaddexp, sinh) so that they are accurate near l = 0 and do not
overflow before they have to. `safe_log_ratio` is the largest |l| at which f and the weight are still
finite in float32/bfloat16; divergences whose weight grows like exp(k l) (fkl, chi2, alpha) need a
log-ratio clip beyond it (see `token_advantages(log_ratio_clip=...)`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

# float32 and bfloat16 overflow at exp(88.7); keep a margin for the products in f.
_EXP_LIMIT = 80.0


@dataclass(frozen=True)
class Divergence:
    """An f-divergence, evaluated per token from the log-ratio l = teacher_logprob - student_logprob."""

    name: str
    f_of_log_ratio: Callable[[Tensor], Tensor]
    weight_of_log_ratio: Callable[[Tensor], Tensor]
    safe_log_ratio: float | None = None  # None: finite for any finite l
    # (student log-probs, teacher log-probs) -> p f(q / p) elementwise, written so that it stays accurate where
    # p << q or q << p; None: exp(log p) * f(log q - log p)
    perspective_of_logprobs: Callable[[Tensor, Tensor], Tensor] | None = None

    def f(self, log_ratio: Tensor) -> Tensor:
        """The generator f at u = exp(log_ratio); E_p[f] is the divergence D_f(q || p)."""
        return self.f_of_log_ratio(log_ratio)

    def reward(self, log_ratio: Tensor) -> Tensor:
        """Stop-gradient OPD reward -f(u)."""
        return -self.f_of_log_ratio(log_ratio)

    def weight(self, log_ratio: Tensor) -> Tensor:
        """OPD+ weight w_f(u) = -f(u) + u f'(u): the exact per-token policy-gradient weight."""
        return self.weight_of_log_ratio(log_ratio)

    def perspective(self, student_logprobs: Tensor, teacher_logprobs: Tensor) -> Tensor:
        """p f(q / p) elementwise: one token's share of D_f(q || p) = sum_y p(y) f(q(y) / p(y)), differentiable
        in both (the dense and top-k estimators sum it over the vocabulary)."""
        if self.perspective_of_logprobs is not None:
            return self.perspective_of_logprobs(student_logprobs, teacher_logprobs)
        return torch.exp(student_logprobs) * self.f_of_log_ratio(teacher_logprobs - student_logprobs)

    def __repr__(self) -> str:
        return f"Divergence({self.name!r})"

    @classmethod
    def from_f(cls, fn: Callable[[Tensor], Tensor], name: str = "custom") -> "Divergence":
        """Build a divergence from any torch-differentiable generator f(u); the weight comes from autograd.

        Checks f(1) = 0 and convexity on a grid of u in [e^-6, e^6] and raises ValueError otherwise.
        """
        _check_generator(fn, name)

        def f_of_log_ratio(log_ratio: Tensor) -> Tensor:
            return fn(torch.exp(log_ratio))

        def weight_of_log_ratio(log_ratio: Tensor) -> Tensor:
            with torch.enable_grad():
                u = torch.exp(log_ratio.detach()).requires_grad_(True)
                f_u = fn(u)
                (df_du,) = torch.autograd.grad(f_u.sum(), u)
            return (-f_u + u * df_du).detach()

        return cls(name, f_of_log_ratio, weight_of_log_ratio, safe_log_ratio=None)


def _check_generator(fn: Callable[[Tensor], Tensor], name: str) -> None:
    one = torch.ones((), dtype=torch.float64)
    try:
        f_one = float(fn(one))
    except Exception as error:  # a user callable: report what it raised, in one line
        raise ValueError(f"divergence {name!r}: f(u) failed on a float64 tensor: {error}") from error
    if not math.isfinite(f_one) or abs(f_one) > 1e-8:
        raise ValueError(f"divergence {name!r}: f(1) must be 0 for an f-divergence, got {f_one:g}")
    u = torch.exp(torch.linspace(-6.0, 6.0, 401, dtype=torch.float64))
    f_u = fn(u)
    if f_u.shape != u.shape or not torch.isfinite(f_u).all():
        raise ValueError(f"divergence {name!r}: f(u) must be elementwise and finite for u in [e^-6, e^6]")
    slopes = torch.diff(f_u) / torch.diff(u)
    drop = torch.diff(slopes)
    tolerance = 1e-9 * (1.0 + slopes.abs()[1:])
    if (drop < -tolerance).any():
        worst = int(torch.argmin(drop / tolerance)) + 1
        raise ValueError(
            f"divergence {name!r}: f must be convex, but its slope decreases near u = {float(u[worst]):.4g}"
        )


# ----------------------------------------------------------------------------- built-in generators
# Each pair is f and w = -f + u f' in closed form in l; the comment gives f(u) as in the literature.


def _rkl() -> Divergence:  # f = -log u  ->  D = KL(p || q);  w = l - 1;  p f = p (log p - log q)
    return Divergence("rkl", lambda l: -l, lambda l: l - 1.0,
                      perspective_of_logprobs=lambda lp, lq: torch.exp(lp) * (lp - lq))


def _fkl() -> Divergence:  # f = u log u  ->  D = KL(q || p);  w = u;  p f = q (log q - log p)
    return Divergence("fkl", lambda l: l * torch.exp(l), torch.exp, safe_log_ratio=_EXP_LIMIT,
                      perspective_of_logprobs=lambda lp, lq: torch.exp(lq) * (lq - lp))


def _jsd(beta: float) -> Divergence:
    # f = b u log u - m log m with m = b u + 1 - b (KL to the mixture b q + (1-b) p); w = (1 - b) log m.
    log_beta, log_one_minus_beta = math.log(beta), math.log1p(-beta)

    def log_mixture(l: Tensor) -> Tensor:  # log m = log(b e^l + 1 - b)
        return torch.logaddexp(l + log_beta, torch.full_like(l, log_one_minus_beta))

    def f(l: Tensor) -> Tensor:
        # b u (l - log m) - (1-b) log m, with l - log m = -log(b + (1-b) e^-l) computed without cancellation
        l_minus_log_m = -torch.logaddexp(torch.full_like(l, log_beta), log_one_minus_beta - l)
        return beta * torch.exp(l) * l_minus_log_m - (1.0 - beta) * log_mixture(l)

    def weight(l: Tensor) -> Tensor:
        return (1.0 - beta) * log_mixture(l)

    def perspective(lp: Tensor, lq: Tensor) -> Tensor:  # b KL(q || M) + (1 - b) KL(p || M), M = b q + (1 - b) p
        log_m = torch.logaddexp(lq + log_beta, lp + log_one_minus_beta)
        return beta * torch.exp(lq) * (lq - log_m) + (1.0 - beta) * torch.exp(lp) * (lp - log_m)

    name = "jsd" if beta == 0.5 else f"jsd:{beta:g}"
    return Divergence(name, f, weight, safe_log_ratio=_EXP_LIMIT, perspective_of_logprobs=perspective)


def _tv() -> Divergence:  # f = |u - 1| / 2;  w = sign(u - 1) / 2;  p f = |q - p| / 2
    return Divergence("tv", lambda l: 0.5 * torch.expm1(l).abs(), lambda l: 0.5 * torch.sign(l),
                      perspective_of_logprobs=lambda lp, lq: 0.5 * (torch.exp(lq) - torch.exp(lp)).abs())


def _hellinger() -> Divergence:  # f = (sqrt u - 1)^2;  w = sqrt u - 1
    return Divergence(
        "hellinger",
        lambda l: torch.expm1(0.5 * l).square(),
        lambda l: torch.expm1(0.5 * l),
        safe_log_ratio=_EXP_LIMIT,
        perspective_of_logprobs=lambda lp, lq: (torch.exp(0.5 * lq) - torch.exp(0.5 * lp)).square(),  # (vq - vp)^2
    )


def _chi2() -> Divergence:  # Pearson: f = (u - 1)^2;  w = u^2 - 1
    return Divergence(
        "chi2",
        lambda l: torch.expm1(l).square(),
        lambda l: torch.expm1(2.0 * l),
        safe_log_ratio=_EXP_LIMIT / 2,
        perspective_of_logprobs=_pearson,
    )


def _pearson(lp: Tensor, lq: Tensor) -> Tensor:
    """(q - p)^2 / p: p (u - 1)^2 where q <= p, q u (1 - 1/u)^2 where q > p, so neither side overflows early.
    Each branch sees only its own log-ratios (an inf in the branch not taken would poison the gradient)."""
    l = lq - lp
    above, below = l.clamp(min=0), l.clamp(max=0)
    return torch.where(l > 0, torch.exp(lp + 2.0 * above) * torch.expm1(-above).square(),
                       torch.exp(lp) * torch.expm1(below).square())


def _neyman_chi2() -> Divergence:  # f = (1 - u)^2 / u = 4 sinh^2(l/2);  w = 2 (1 - 1/u)
    return Divergence(
        "neyman_chi2",
        lambda l: 4.0 * torch.sinh(0.5 * l).square(),
        lambda l: -2.0 * torch.expm1(-l),
        safe_log_ratio=_EXP_LIMIT,
        perspective_of_logprobs=lambda lp, lq: _pearson(lq, lp),  # (p - q)^2 / q
    )


def _expm1_over(a: float, l: Tensor) -> Tensor:
    """(e^{a l} - 1) / a, continuous at a = 0 where it is l."""
    return l.clone() if a == 0.0 else torch.expm1(a * l) / a


def _alpha(a: float) -> Divergence:
    # Amari alpha: f = (u^a - a u - (1 - a)) / (a (a - 1));  w = (u^a - 1) / a.
    # a -> 0 gives rkl + (u - 1), a -> 1 gives fkl - (u - 1): the same divergences, weights shifted by 1.
    # f is written two equivalent ways so that neither divides by a vanishing a or a - 1:
    #   f = ((u^a - 1)/a - (u - 1)) / (a - 1)                  (used for a < 1/2)
    #   f = (u (u^(a-1) - 1)/(a - 1) - (u - 1)) / a            (used for a >= 1/2)
    def f(l: Tensor) -> Tensor:
        if a < 0.5:
            return (_expm1_over(a, l) - torch.expm1(l)) / (a - 1.0)
        return (torch.exp(l) * _expm1_over(a - 1.0, l) - torch.expm1(l)) / a

    def weight(l: Tensor) -> Tensor:
        return _expm1_over(a, l)

    def perspective(lp: Tensor, lq: Tensor) -> Tensor:
        # p f(l) near l = 0 (accurate there); (q^a p^(1-a) - a q - (1 - a) p) / (a (a - 1)) elsewhere, where
        # p f(l) could overflow; each branch sees only its own log-ratios
        l = lq - lp
        near = l.abs() < 1.0
        l_near, lq_far = torch.where(near, l, 0.0), torch.where(near, lp + 2.0, lq)
        far = (torch.exp(a * lq_far + (1.0 - a) * lp) - a * torch.exp(lq_far) - (1.0 - a) * torch.exp(lp)) / (a * (a - 1.0))
        return torch.where(near, torch.exp(lp) * f(l_near), far)

    def limit_perspective(lp: Tensor, lq: Tensor) -> Tensor:  # a = 0: p log(p/q) + q - p;  a = 1: q log(q/p) - q + p
        lx, ly = (lp, lq) if a == 0.0 else (lq, lp)
        return torch.exp(lx) * (lx - ly) + torch.exp(ly) - torch.exp(lx)

    return Divergence(f"alpha:{a:g}", f, weight, safe_log_ratio=_EXP_LIMIT / max(1.0, abs(a), abs(a - 1.0)),
                      perspective_of_logprobs=limit_perspective if a in (0.0, 1.0) else perspective)


_SIMPLE = {
    "rkl": _rkl,
    "fkl": _fkl,
    "tv": _tv,
    "hellinger": _hellinger,
    "chi2": _chi2,
    "neyman_chi2": _neyman_chi2,
}
VALID_NAMES = ("rkl", "fkl", "jsd", "jsd:<beta in (0,1)>", "tv", "hellinger", "chi2", "neyman_chi2", "alpha:<a>")


def get_divergence(name: str | Divergence) -> Divergence:
    """Parse a divergence name: rkl, fkl, jsd, jsd:0.3, tv, hellinger, chi2, neyman_chi2, alpha:0.5, ..."""
    if isinstance(name, Divergence):
        return name
    if not isinstance(name, str):
        raise ValueError(f"divergence must be a name or a Divergence, got {type(name).__name__}")
    key = name.strip().lower()
    if key in _SIMPLE:
        return _SIMPLE[key]()
    family, _, parameter = key.partition(":")
    if family == "jsd" and parameter == "":
        return _jsd(0.5)
    if family in ("jsd", "alpha") and parameter:
        try:
            value = float(parameter)
        except ValueError:
            raise ValueError(f"divergence {name!r}: parameter {parameter!r} is not a number") from None
        if not math.isfinite(value):
            raise ValueError(f"divergence {name!r}: parameter must be finite")
        if family == "jsd":
            if not 0.0 < value < 1.0:
                raise ValueError(f"divergence {name!r}: jsd beta must be in (0, 1), got {value:g}")
            return _jsd(value)
        return _alpha(value)
    raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(VALID_NAMES)}")
