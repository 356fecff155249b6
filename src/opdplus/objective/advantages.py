"""Per-token OPD / OPD+ advantages from student and teacher log-probs of the sampled tokens.

    A_t = own_t + sum_{t' > t, unmasked} gamma^k * (-f(u_t'))      (0 at masked positions)

own_t is the stop-gradient reward -f(u_t) for "opd" and the exact weight w_f(u_t) for "opd+"; k counts the
unmasked tokens in (t, t'], so environment/tool tokens inside a response neither receive nor pass on credit.
gamma = 0 is the usual per-token objective, gamma = 1 the exact sequence-level one.

Nothing here normalizes, whitens or subtracts a baseline: the difference between the two estimators
is exactly what such a transform would hide.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opdplus.objective.divergences import Divergence, get_divergence

ESTIMATORS = ("opd", "opd+")


def check_estimator(estimator: str) -> str:
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    return estimator


def check_token_inputs(mask: Tensor, **logprobs: Tensor | None) -> Tensor:
    """Validate [B, T] log-prob tensors against the mask; returns the mask as bool.

    Raises ValueError naming the offending argument. Values at masked positions are not inspected:
    padding may hold anything.
    """
    if not isinstance(mask, Tensor):
        raise ValueError(f"mask must be a tensor, got {type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"mask must have shape [batch, time], got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError("mask must be bool or hold only 0 and 1")
        mask = mask.bool()
    for name, tensor in logprobs.items():
        if tensor is None:
            continue
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but mask has shape {tuple(mask.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if not torch.isfinite(tensor.detach()[mask]).all():
            raise ValueError(f"{name} holds NaN or inf at unmasked positions")
    return mask


def check_gamma(gamma: float) -> float:
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    return float(gamma)


def check_positive_or_unset(name: str, value: float | None) -> float | None:
    """The one rule (and message) for every optional positive setting: clips, caps, counts."""
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive or unset (None), got {value}")
    return value


def check_log_ratio_clip(log_ratio_clip: float | None) -> float | None:
    return check_positive_or_unset("log_ratio_clip", log_ratio_clip)


def log_ratios(
    student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, log_ratio_clip: float | None
) -> Tensor:
    """l = teacher - student, detached, 0 at masked positions, clamped to [-clip, clip] when clip is set."""
    log_ratio = torch.where(mask, teacher_logprobs.detach() - student_logprobs.detach(), 0.0)
    if log_ratio_clip is not None:
        log_ratio = log_ratio.clamp(-log_ratio_clip, log_ratio_clip)
    return log_ratio


def discounted_future_sum(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """S_t = sum_{t' > t, mask} gamma^k rewards_t', k = number of unmasked positions in (t, t']. [B, T] -> [B, T]."""
    rewards = torch.where(mask, rewards, 0.0)
    if gamma == 0.0:
        return torch.zeros_like(rewards)
    if gamma == 1.0:
        # reverse cumulative sum, excluding t itself
        return rewards.flip(-1).cumsum(-1).flip(-1) - rewards
    future = torch.zeros_like(rewards)
    carry = torch.zeros_like(rewards[:, 0])  # S_t for the position being filled
    for t in range(rewards.shape[1] - 1, -1, -1):
        future[:, t] = carry
        carry = torch.where(mask[:, t], gamma * (rewards[:, t] + carry), carry)
    return future


def advantages_from_log_ratio(
    log_ratio: Tensor, mask: Tensor, divergence: Divergence, estimator: str, gamma: float, center: bool = False
) -> Tensor:
    """The advantage given already-validated, detached and clipped log-ratios l [B, T]."""
    rewards = divergence.reward(log_ratio)
    own = divergence.weight(log_ratio) if estimator == "opd+" else rewards
    if center:  # subtract the own term's value at u = 1 (a constant: the expected gradient is unchanged)
        zero = torch.zeros((), dtype=log_ratio.dtype, device=log_ratio.device)
        own = own - (divergence.weight(zero) if estimator == "opd+" else divergence.reward(zero))
    advantages = own + discounted_future_sum(rewards, mask, gamma)
    return torch.where(mask, advantages, 0.0)


def token_advantages(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    divergence: str | Divergence,
    estimator: str = "opd+",
    gamma: float = 0.0,
    log_ratio_clip: float | None = None,
    center: bool = False,
) -> Tensor:
    """Detached per-token advantages [B, T] for a policy-gradient loss -sum_t A_t log p_theta(y_t | s_t).

    Args:
        student_logprobs: [B, T] log p_theta(y_t | s_t) of the sampled tokens (the policy that sampled them).
        teacher_logprobs: [B, T] log q(y_t | s_t) of the same tokens.
        mask: [B, T] bool or 0/1; 0 for padding and for environment/tool tokens.
        divergence: a name understood by `get_divergence` ("rkl", "fkl", "jsd", "alpha:0.5", ...) or a Divergence.
        estimator: "opd+" (exact weight w_f) or "opd" (stop-gradient reward -f, biased except for rkl).
        gamma: credit from later tokens' rewards, in [0, 1]. 0 = per-token objective, 1 = sequence objective.
        log_ratio_clip: clamp l = teacher - student to [-c, c] first. Weights such as fkl's u = e^l and
            chi2's u^2 - 1 are unbounded: one token the student finds very unlikely but the teacher likes
            can dominate a whole batch. Clipping trades that variance for a bias confined to |l| > c.
        center: subtract the own term's value at u = 1 (w_f(1) = f'(1) for "opd+"; 0 already for "opd"), so
            that tokens on which teacher and student agree get no push. Because E_p[grad log p] = 0 at every
            state this leaves the expected gradient exactly unchanged; it only removes the variance the
            constant adds (large for rkl, whose w = l - 1). It is the same as writing the generator with
            f'(1) = 0. Off by default: nothing is shifted unless asked.
    """
    divergence = get_divergence(divergence)
    check_estimator(estimator)
    gamma = check_gamma(gamma)
    log_ratio_clip = check_log_ratio_clip(log_ratio_clip)
    mask = check_token_inputs(mask, student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs)
    with torch.no_grad():
        log_ratio = log_ratios(student_logprobs, teacher_logprobs, mask, log_ratio_clip)
        return advantages_from_log_ratio(log_ratio, mask, divergence, estimator, gamma, center)
