"""The OPD / OPD+ policy-gradient loss, on- and off-policy.

On-policy (samples from the current policy theta):   loss = -sum_t A_t * log p_theta(y_t | s_t)
Off-policy (samples from theta_old, several updates per batch):
    rho_t = p_theta / p_theta_old,   loss = -sum_t rho_t * A_t   (PPO-clipped when clip_eps is set)

For "opd+" the advantage is always computed from the *current* log-probs: the per-token objective
E_old[rho f(q / p_theta)] has gradient -E_old[rho w_f(q / p_theta) dlog p_theta], so the weight must use
u = q / p_theta, not q / p_theta_old. For "opd" the conventional stop-gradient reward -f(q / p_theta_old)
of the behavior policy is used, as existing OPD implementations do.
"""

from __future__ import annotations

import torch
from torch import Tensor

from opdplus.objective.advantages import (
    advantages_from_log_ratio,
    check_estimator,
    check_gamma,
    check_log_ratio_clip,
    check_positive_or_unset,
    check_token_inputs,
    discounted_future_sum,
    log_ratios,
)
from opdplus.objective.divergences import Divergence, get_divergence
from opdplus.objective.spans import SpanScores, span_loss_terms, span_token_log_ratios

# "sequence-sum" (the default) divides by a number that does not depend on what was sampled, so the expected
# step is the gradient of the objective; "token-mean" divides by the sampled token count, which is random when
# lengths vary (biased: docs/theory.md, "Normalisation").
REDUCTIONS = ("sequence-sum", "token-mean", "sequence-mean", "sum")


def opd_loss(
    logprobs: Tensor,
    teacher_logprobs: Tensor,
    mask: Tensor,
    *,
    divergence: str | Divergence,
    estimator: str = "opd+",
    behavior_logprobs: Tensor | None = None,
    gamma: float = 0.0,
    clip_eps: float | None = None,
    log_ratio_clip: float | None = None,
    reduction: str = "sequence-sum",
    num_sequences: int | float | None = None,
    num_tokens: int | float | None = None,
    center: bool = False,
) -> tuple[Tensor, dict[str, float]]:
    """Scalar loss to minimize and a dict of plain-float metrics.

    Args:
        logprobs: [B, T] log p_theta of the sampled tokens, carrying the gradient.
        teacher_logprobs: [B, T] teacher log-probs of the same tokens (no gradient needed).
        mask: [B, T] bool or 0/1, 0 for padding and environment/tool tokens.
        behavior_logprobs: [B, T] log-probs of the policy that sampled the batch, for the 2nd, 3rd, ...
            update on the same batch. None means the samples are from the current policy.
        clip_eps: PPO ratio clip (only with behavior_logprobs).
        reduction: "sequence-sum" (default) sums each sequence's tokens and divides by the number of sequences,
            or by `num_sequences` when given: pass the step's global number of sequences so that splitting a
            batch into micro-batches or processes leaves the gradient unchanged. The divisor does not depend on
            the sampled lengths, so the expected gradient is exactly that of E_y[sum_t ...]. "token-mean"
            divides by the number of unmasked tokens (or `num_tokens`): a random divisor when lengths vary, which
            biases the expected step (measured in docs/theory.md). "sequence-mean" averages the per-sequence
            token means over sequences with at least one token (biased too). "sum" sums.
        Other arguments (gamma, log_ratio_clip, center) as in `token_advantages`.

    Metrics: loss, log_ratio_mean (teacher - current student, unclipped), advantage_abs_mean/max,
    log_ratio_clip_fraction, ppo_clip_fraction, divergence (mean f over tokens: the per-token divergence
    estimate), reverse_kl (mean student - teacher log-prob), num_tokens (local).
    """
    divergence = get_divergence(divergence)
    check_estimator(estimator)
    gamma = check_gamma(gamma)
    log_ratio_clip = check_log_ratio_clip(log_ratio_clip)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    for name, value in (("clip_eps", clip_eps), ("num_sequences", num_sequences), ("num_tokens", num_tokens)):
        check_positive_or_unset(name, value)
    mask = check_token_inputs(
        mask, logprobs=logprobs, teacher_logprobs=teacher_logprobs, behavior_logprobs=behavior_logprobs
    )
    loss, metrics, _ = policy_gradient_loss(
        logprobs, teacher_logprobs, mask, divergence, estimator, gamma, log_ratio_clip, center, clip_eps,
        behavior_logprobs=behavior_logprobs, reduction=reduction, num_sequences=num_sequences,
        num_tokens=num_tokens)
    return loss, metrics


def policy_gradient_loss(
    logprobs: Tensor,  # [B, T] current policy, with gradient
    teacher_logprobs: Tensor,  # [B, T]
    mask: Tensor,  # [B, T] bool
    divergence: Divergence,
    estimator: str,
    gamma: float,
    log_ratio_clip: float | None,
    center: bool,
    clip_eps: float | None,
    *,
    behavior_logprobs: Tensor | None,  # [B, T] or None (on-policy)
    reduction: str,
    num_sequences: int | float | None = None,
    num_tokens: int | float | None = None,
    sample_weights: Tensor | None = None,  # [B, T] detached per-token importance weights (another sampler)
    divergences: Tensor | None = None,  # [B, T] per-position divergences with gradient (dense / top-k)
    sequence_advantages: Tensor | None = None,  # [B] added to every token of a row (the outcome reward's)
    teacher_spans: SpanScores | None = None,  # a re-tokenizing teacher's scores per span (teacher_logprobs unused)
) -> tuple[Tensor, dict[str, float], Tensor]:
    """`opd_loss` on already-validated arguments: (loss, metrics, advantages [B, T]).

    With `divergences` (the dense and top-k estimators) each position's divergence is differentiated directly
    and later positions' divergences are the rewards of the policy-gradient term:
    loss_t = D_t - A_t log p_theta(y_t), A_t = sum_{t' > t} gamma^k (-D_t').
    With `teacher_spans` the advantages are span-level (`span_loss_terms`), the rest is unchanged."""
    # The policy the advantage is evaluated at: always the current one for opd+ (exact off-policy weight).
    off_policy = behavior_logprobs is not None
    advantage_policy = behavior_logprobs if off_policy and estimator == "opd" else logprobs
    with torch.no_grad():
        if teacher_spans is not None:  # l_k per span, placed at each span's last token [B, T]
            advantages, log_ratio, raw_log_ratio = span_loss_terms(
                teacher_spans, advantage_policy, mask, divergence, estimator, gamma, log_ratio_clip, center)
            if off_policy and estimator == "opd":  # the metrics read the current policy's log-ratio
                raw_log_ratio = span_token_log_ratios(teacher_spans, logprobs, mask)
        else:
            log_ratio = log_ratios(advantage_policy, teacher_logprobs, mask, log_ratio_clip)  # [B, T]
            raw_log_ratio = torch.where(mask, teacher_logprobs.detach() - logprobs.detach(), 0.0)  # [B, T]
            if divergences is not None:
                advantages = discounted_future_sum(-divergences.detach(), mask, gamma)  # [B, T]
            else:
                advantages = advantages_from_log_ratio(log_ratio, mask, divergence, estimator, gamma, center)
        distillation_advantages = advantages
        if sequence_advantages is not None:
            advantages = torch.where(mask, advantages + sequence_advantages[:, None].to(advantages.dtype), 0.0)

    safe_logprobs = torch.where(mask, logprobs, 0.0)
    if off_policy:
        ratio = torch.exp(safe_logprobs - torch.where(mask, behavior_logprobs.detach(), 0.0))
        surrogate = ratio * advantages
        if clip_eps is not None:
            clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
            ppo_clipped = (clipped < surrogate) & mask
            surrogate = torch.minimum(surrogate, clipped)
        else:
            ppo_clipped = torch.zeros_like(mask)
        per_token_loss = -surrogate
    else:
        per_token_loss = -advantages * safe_logprobs
        ppo_clipped = torch.zeros_like(mask)
    if sample_weights is not None:
        per_token_loss = per_token_loss * sample_weights
    if divergences is not None:  # the direct term: no token is sampled at s_t, so no sampler weight either
        per_token_loss = per_token_loss + torch.where(mask, divergences, 0.0)
    per_token_loss = torch.where(mask, per_token_loss, 0.0)

    tokens_per_sequence = mask.sum(-1)
    if reduction == "sum":
        loss = per_token_loss.sum()
    elif reduction == "sequence-sum":
        loss = per_token_loss.sum() / (num_sequences if num_sequences is not None else mask.shape[0])
    elif reduction == "token-mean":
        denominator = num_tokens if num_tokens is not None else tokens_per_sequence.sum().clamp(min=1)
        loss = per_token_loss.sum() / denominator
    else:
        sequence_means = per_token_loss.sum(-1) / tokens_per_sequence.clamp(min=1)
        loss = sequence_means.sum() / (tokens_per_sequence > 0).sum().clamp(min=1)

    metrics = _metrics(loss, raw_log_ratio, mask, log_ratio, advantages, ppo_clipped, divergence, log_ratio_clip)
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        if divergences is not None:  # the exact per-position divergence instead of the one-sample estimate
            metrics["divergence"] = float(torch.where(mask, divergences.detach().double(), 0.0).sum() / count)
        if sequence_advantages is not None:
            distillation = float(torch.where(mask, distillation_advantages.abs().double(), 0.0).sum() / count)
            reward = float(torch.where(mask, sequence_advantages[:, None].abs().double(), 0.0).sum() / count)
            metrics["reward_advantage_abs_mean"] = reward
            metrics["distillation_share"] = distillation / (distillation + reward) if distillation + reward else 1.0
    return loss, metrics, advantages


def _metrics(loss, raw_log_ratio, mask, log_ratio, advantages, ppo_clipped, divergence,
             log_ratio_clip) -> dict[str, float]:
    """raw_log_ratio [B, T]: teacher - current student, unclipped; log_ratio the one the advantages used."""
    with torch.no_grad():
        count = mask.sum().clamp(min=1)

        def token_mean(values: Tensor) -> Tensor:  # in float64 so that bf16 inputs give accurate metrics
            return torch.where(mask, values.double(), 0.0).sum() / count

        clipped = raw_log_ratio.abs() > log_ratio_clip if log_ratio_clip is not None else torch.zeros_like(mask)
        values = torch.stack([
            loss.detach().double(),
            token_mean(raw_log_ratio),
            token_mean(advantages.abs()),
            advantages.abs().max().double() if advantages.numel() else torch.zeros((), dtype=torch.float64),
            token_mean(clipped),
            token_mean(ppo_clipped),
            token_mean(divergence.f(log_ratio)),
            token_mean(-raw_log_ratio),
            mask.sum().double(),
        ]).tolist()
    names = ("loss", "log_ratio_mean", "advantage_abs_mean", "advantage_abs_max", "log_ratio_clip_fraction",
             "ppo_clip_fraction", "divergence", "reverse_kl", "num_tokens")
    return dict(zip(names, values))
