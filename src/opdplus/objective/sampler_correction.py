"""Samples drawn by a rollout engine whose numerics differ from the trainer's (vLLM kernels, bf16, another
attention) come from a slightly different policy p_engine than the p_theta the loss differentiates.

Weighting each token's term by rho_t = p_theta(y_t|s_t) / p_engine(y_t|s_t) makes the per-token estimate exact
again: E_{y~p_engine}[rho w_f(u) grad log p_theta] = E_{y~p_theta}[w_f(u) grad log p_theta] at every state (the
states themselves are the engine's, as for any off-policy update: docs/theory.md). The ratio is truncated at
`cap` (truncated importance sampling, as verl and slime do for the same mismatch): a token the engine found far
less likely than the trainer does cannot dominate the step; the bias is confined to the truncated tokens, whose
share is reported.
"""

from __future__ import annotations

import torch
from torch import Tensor


def importance_weights(logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor,
                       cap: float | None) -> tuple[Tensor, dict[str, float]]:
    """Detached truncated ratios min(p_theta / p_engine, cap) [B, T] (0 off the mask) and how far the two apart.

    logprobs: [B, T] the trainer's log-probs of the sampled tokens; engine_logprobs: [B, T] the engine's; mask
    [B, T] bool. Metrics: rollout_logprob_diff_mean / _max (|log p_theta - log p_engine| over the tokens),
    rollout_kl (per-token KL(p_engine || p_theta), the non-negative estimate rho - 1 - log rho) and
    rollout_ratio_truncated_fraction."""
    with torch.no_grad():
        log_ratio = torch.where(mask, logprobs.detach().double() - engine_logprobs.double(), 0.0)  # [B, T]
        ratio = log_ratio.exp()
        weights = ratio.clamp(max=cap) if cap is not None else ratio
        count = mask.sum().clamp(min=1)
        gap = log_ratio.abs()
        metrics = {
            "rollout_logprob_diff_mean": float(gap.sum() / count),
            "rollout_logprob_diff_max": float(gap.max()) if gap.numel() else 0.0,
            "rollout_kl": float(torch.where(mask, ratio - 1.0 - log_ratio, 0.0).sum() / count),
            "rollout_ratio_truncated_fraction": float(((ratio > cap) & mask).sum() / count) if cap is not None else 0.0,
        }
    return torch.where(mask, weights, 0.0).to(logprobs.dtype), metrics
