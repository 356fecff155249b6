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


@dataclass(frozen=True)
class Objective:
    """divergence: a name for `get_divergence` or a Divergence; estimator "opd+" (exact) or "opd"
    (stop-gradient); gamma: credit from later tokens; log_ratio_clip: clamp of l = teacher - student;
    center: subtract w_f(1); clip_eps: PPO ratio clip for the updates after the first on a batch."""

    divergence: Divergence | str
    estimator: str = "opd+"
    gamma: float = 0.0
    log_ratio_clip: float | None = None
    center: bool = False
    clip_eps: float | None = None

    def __post_init__(self):  # validated here, once
        object.__setattr__(self, "divergence", get_divergence(self.divergence))
        check_estimator(self.estimator)
        object.__setattr__(self, "gamma", check_gamma(self.gamma))
        check_log_ratio_clip(self.log_ratio_clip)
        if self.clip_eps is not None and not self.clip_eps > 0:
            raise ValueError(f"clip_eps must be positive or None, got {self.clip_eps}")

    def loss(self, logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor, *, num_tokens: float,
             behavior_logprobs: Tensor | None = None) -> tuple[Tensor, dict[str, float], Tensor]:
        """(loss summed over this micro-batch and divided by `num_tokens`, metrics, advantages [B, T]).

        logprobs [B, T] with gradient; mask [B, T] bool; behavior_logprobs [B, T] for a later update on a batch."""
        return policy_gradient_loss(logprobs, teacher_logprobs, mask, self.divergence, self.estimator, self.gamma,
                                    self.log_ratio_clip, self.center, self.clip_eps,
                                    behavior_logprobs=behavior_logprobs, reduction="token-mean",
                                    num_tokens=num_tokens)

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
