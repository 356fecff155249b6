"""The rules on how the objective's terms are shaped, stated once.

`Objective` applies them when it is built, and `TrainConfig.validate` applies the same ones before anything is
loaded, so a rule and its message cannot drift apart between the two.
"""

from __future__ import annotations

import math

from opdplus.objective.advantages import check_gamma, check_positive_or_unset

REDUCTIONS = ("sequence-sum", "token-mean")  # the ones the trainer offers (opd_loss also has biased variants)


def check_objective_settings(*, gamma: float, log_ratio_clip: float | None, clip_eps: float | None,
                             reduction: str, rollout_ratio_cap: float | None, reward_weight: float,
                             reduction_name: str = "reduction") -> None:
    """Raise ValueError naming the first invalid setting; `reduction_name` is the caller's name for it."""
    check_gamma(gamma)
    for name, value in (("log_ratio_clip", log_ratio_clip), ("clip_eps", clip_eps)):
        check_positive_or_unset(name, value)
    if rollout_ratio_cap is not None and not rollout_ratio_cap >= 1:
        raise ValueError(f"rollout_ratio_cap must be >= 1 or unset, got {rollout_ratio_cap}")
    if not (math.isfinite(reward_weight) and reward_weight >= 0):
        raise ValueError(f"reward_weight must be a finite number >= 0, got {reward_weight}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction_name} must be {' or '.join(REDUCTIONS)}, got {reduction!r}")
