"""The run's objective, built once: which divergence, which estimator, and how its terms are shaped.

The trainer builds one `Objective` from its config and uses it for the loss of every micro-batch and for every
metric, so the settings are parsed and validated once and no metric re-implements a piece of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opdplus.objective.advantages import check_estimator, check_gamma, check_log_ratio_clip, log_ratios
from opdplus.objective.divergences import Divergence, get_divergence
from opdplus.objective.loss import policy_gradient_loss
from opdplus.objective.sampler_correction import importance_weights


@dataclass(frozen=True)
class Objective:
    """divergence: a name for `get_divergence` or a Divergence; estimator "opd+" (exact) or "opd"
    (stop-gradient); gamma: credit from later tokens; log_ratio_clip: clamp of l = teacher - student;
    center: subtract w_f(1); clip_eps: PPO ratio clip for the updates after the first on a batch;
    reduction: "sequence-sum" (unbiased: divided by the step's number of sequences) or "token-mean" (divided by
    the step's token count: biased when lengths vary); rollout_ratio_cap: truncation of the importance ratio
    p_theta / p_engine that corrects samples from a rollout engine with other numerics (None: untruncated)."""

    divergence: Divergence | str
    estimator: str = "opd+"
    gamma: float = 0.0
    log_ratio_clip: float | None = None
    center: bool = False
    clip_eps: float | None = None
    reduction: str = "sequence-sum"
    rollout_ratio_cap: float | None = 2.0  # truncation of p_theta / p_engine when an engine sampled


    def __post_init__(self):  # validated here, once
        object.__setattr__(self, "divergence", get_divergence(self.divergence))
        check_estimator(self.estimator)
        object.__setattr__(self, "gamma", check_gamma(self.gamma))
        check_log_ratio_clip(self.log_ratio_clip)
        if self.clip_eps is not None and not self.clip_eps > 0:
            raise ValueError(f"clip_eps must be positive or None, got {self.clip_eps}")
        if self.rollout_ratio_cap is not None and not self.rollout_ratio_cap >= 1:
            raise ValueError(f"rollout_ratio_cap must be >= 1 or None, got {self.rollout_ratio_cap}")
        if self.reduction not in ("sequence-sum", "token-mean"):
            raise ValueError(f"reduction must be sequence-sum or token-mean, got {self.reduction!r}")

    def loss(self, logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, *, num_sequences: float,
             num_tokens: float, behavior_logprobs: Tensor | None = None,
             sample_weights: Tensor | None = None) -> tuple[Tensor, dict[str, float], Tensor]:
        """(loss summed over this micro-batch and divided by the whole step's `num_sequences` or `num_tokens`,
        metrics, advantages [B, T]).

        logprobs [B, T] with gradient; mask [B, T] bool; behavior_logprobs [B, T] for a later update on a batch;
        sample_weights [B, T] from `sampler_weights` when a rollout engine sampled."""
        return policy_gradient_loss(logprobs, teacher_logprobs, mask, self.divergence, self.estimator, self.gamma,
                                    self.log_ratio_clip, self.center, self.clip_eps,
                                    behavior_logprobs=behavior_logprobs, reduction=self.reduction,
                                    num_sequences=num_sequences, num_tokens=num_tokens, sample_weights=sample_weights)

    def sampler_weights(self, logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        """Truncated importance weights p_theta / p_engine [B, T] and the mismatch metrics (see
        opdplus.objective.sampler_correction)."""
        return importance_weights(logprobs, engine_logprobs, mask, self.rollout_ratio_cap)

    def group_metrics(self, groups: list[str], mask: Tensor, student_logprobs: Tensor, teacher_logprobs: Tensor,
                      advantages: Tensor) -> dict[str, float]:
        """Per group of rows (e.g. each teacher's): share of tokens, mean per-token divergence, mean |A|.

        groups: one name per row; mask, log-probs and advantages [N, T] (the advantages the loss used)."""
        log_ratio = log_ratios(student_logprobs, teacher_logprobs, mask, self.log_ratio_clip)  # [N, T]
        total = mask.sum().clamp(min=1)
        metrics = {}
        for name in sorted(set(groups)):
            rows = torch.tensor([group == name for group in groups], device=mask.device)
            tokens = mask & rows[:, None]
            count = tokens.sum().clamp(min=1)
            metrics[f"{name}/token_share"] = float(tokens.sum() / total)
            metrics[f"{name}/divergence"] = float(torch.where(tokens, self.divergence.f(log_ratio), 0.0).sum() / count)
            metrics[f"{name}/advantage_abs_mean"] = float(advantages.abs()[tokens].sum() / count)
        return metrics
