"""The run's objective, built once: which divergence, which estimator, and how its terms are shaped.

The trainer builds one `Objective` from its config and uses it for the loss of every micro-batch and for every
metric, so the settings are parsed and validated once and no metric re-implements a piece of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from opdplus.objective.checks import check_objective_settings
from opdplus.objective.dense import position_divergences
from opdplus.objective.divergences import Divergence, get_divergence
from opdplus.objective.loss import policy_gradient_loss
from opdplus.objective.rewards import leave_one_out_advantages
from opdplus.objective.sampler_correction import importance_weights
from opdplus.objective.spans import SpanScores


ALL_ESTIMATORS = ("opd", "opd+", "dense", "topk:K")


def parse_estimator(name: str) -> tuple[str, int | None]:
    """"opd", "opd+", "dense" -> (name, None); "topk:K" -> ("topk", K)."""
    kind, _, parameter = str(name).partition(":")
    if kind == "topk" and parameter.isdigit() and int(parameter) >= 1:
        return "topk", int(parameter)
    if name in ("opd", "opd+", "dense"):
        return name, None
    raise ValueError(f"estimator must be one of {', '.join(ALL_ESTIMATORS)} (K a positive integer), got {name!r}")


@dataclass(frozen=True)
class Objective:
    """divergence: a name for `get_divergence` or a Divergence; estimator "opd+" (exact, the sampled token),
    "opd" (stop-gradient), "dense" (exact, the whole next-token distribution of a local teacher) or "topk:K"
    (exact for the teacher's K most likely tokens plus a tail bucket); gamma: credit from later tokens;
    log_ratio_clip: clamp of l = teacher - student; center: subtract w_f(1); clip_eps: PPO ratio clip for the updates after the first on a batch;
    reduction: "sequence-sum" (unbiased: divided by the step's number of sequences) or "token-mean" (divided by
    the step's token count: biased when lengths vary); rollout_ratio_cap: truncation of the importance ratio
    p_theta / p_engine that corrects samples from a rollout engine with other numerics (None: untruncated);
    reward_weight: lambda of the task's outcome reward added to every response token's advantage."""

    divergence: Divergence | str
    estimator: str = "opd+"
    gamma: float = 0.0
    log_ratio_clip: float | None = None
    center: bool = False
    clip_eps: float | None = None
    reduction: str = "sequence-sum"
    rollout_ratio_cap: float | None = 2.0  # truncation of p_theta / p_engine when an engine sampled
    reward_weight: float = 0.0  # lambda of the outcome reward mixed in (0: pure distillation)

    def __post_init__(self):  # validated here, once
        object.__setattr__(self, "divergence", get_divergence(self.divergence))
        parse_estimator(self.estimator)
        check_objective_settings(gamma=self.gamma, log_ratio_clip=self.log_ratio_clip, clip_eps=self.clip_eps,
                                 reduction=self.reduction, rollout_ratio_cap=self.rollout_ratio_cap,
                                 reward_weight=self.reward_weight)
        object.__setattr__(self, "gamma", float(self.gamma))

    @property
    def needs_distribution(self) -> bool:
        """Dense and top-k read the teacher's next-token distribution, not only the sampled token's log-prob."""
        return parse_estimator(self.estimator)[0] in ("dense", "topk")

    @property
    def top_k(self) -> int | None:
        """K of "topk:K"; None otherwise."""
        return parse_estimator(self.estimator)[1]

    def per_position(self, teacher_distribution):
        """For the student's chunked head: (student log-probs [M, V], flat positions) -> the divergence [M] at
        those positions against `teacher_distribution` (rows aligned with the student's)."""
        def divergences(student_logprobs: Tensor, flat: slice) -> Tensor:
            token_ids, teacher_logprobs = teacher_distribution.support(flat, student_logprobs.device)
            return position_divergences(self.divergence, student_logprobs, teacher_logprobs, token_ids)
        return divergences

    def loss(self, logprobs: Tensor, teacher_logprobs: Tensor | SpanScores, mask: Tensor, *, num_sequences: float,
             num_tokens: float, behavior_logprobs: Tensor | None = None, sample_weights: Tensor | None = None,
             divergences: Tensor | None = None, sequence_advantages: Tensor | None = None,
             ) -> tuple[Tensor, dict[str, float], Tensor]:
        """(loss summed over this micro-batch and divided by the whole step's `num_sequences` or `num_tokens`,
        metrics, advantages [B, T]).

        logprobs [B, T] with gradient; mask [B, T] bool; behavior_logprobs [B, T] for a later update on a batch;
        sample_weights [B, T] from `sampler_weights` when a rollout engine sampled; divergences [B, T] with
        gradient for the dense and top-k estimators (from `per_position`); sequence_advantages [B] the outcome
        reward's share of every token's advantage. teacher_logprobs [B, T], or a re-tokenizing teacher's
        `SpanScores` (span-level advantages, `span_loss_terms`)."""
        if self.needs_distribution != (divergences is not None):
            raise ValueError(f"estimator {self.estimator}: divergences must be given exactly for dense and topk:K")
        spans = teacher_logprobs if isinstance(teacher_logprobs, SpanScores) else None
        if spans is not None and self.needs_distribution:
            raise ValueError(f"estimator {self.estimator} needs a teacher that reads the student's token ids")
        estimator = "opd+" if self.needs_distribution else self.estimator
        return policy_gradient_loss(logprobs, teacher_logprobs if spans is None else None, mask, self.divergence,
                                    estimator, self.gamma, self.log_ratio_clip, self.center, self.clip_eps,
                                    behavior_logprobs=behavior_logprobs, reduction=self.reduction,
                                    num_sequences=num_sequences, num_tokens=num_tokens, sample_weights=sample_weights,
                                    divergences=divergences, sequence_advantages=sequence_advantages,
                                    teacher_spans=spans)

    def sequence_advantages(self, rewards: list[float], prompt_index: list[int], device) -> Tensor | None:
        """[N] lambda (R_i - leave-one-out baseline over the samples of its prompt), or None when lambda = 0."""
        if not self.reward_weight:
            return None
        values = torch.tensor([float(reward) for reward in rewards], dtype=torch.float32, device=device)
        return self.reward_weight * leave_one_out_advantages(values, torch.tensor(prompt_index, device=device))

    def sampler_weights(self, logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, dict]:
        """Truncated importance weights p_theta / p_engine [B, T] and the mismatch metrics (see
        opdplus.objective.sampler_correction)."""
        return importance_weights(logprobs, engine_logprobs, mask, self.rollout_ratio_cap)

    def group_metrics(self, groups: list[str], mask: Tensor, log_ratio: Tensor, advantages: Tensor) -> dict[str, float]:
        """Per group of rows (e.g. each teacher's): share of tokens, mean per-token divergence, mean |A|.

        groups: one name per row; mask, log-ratios (teacher - student, as `Update.log_ratios`) and advantages
        [N, T] (the advantages the loss used)."""
        if self.log_ratio_clip is not None:
            log_ratio = log_ratio.clamp(-self.log_ratio_clip, self.log_ratio_clip)
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
