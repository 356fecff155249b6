"""The task's outcome reward, mixed into the distillation advantage.

Each sample's reward R_i gets a leave-one-out baseline: the mean reward of the *other* samples of the same
prompt. It does not depend on sample i, so E[(R_i - b_i) grad log p(y_i)] = E[R_i grad log p(y_i)]: the baseline
lowers the variance without biasing the step (a mean that included R_i would). A prompt with a single sample
gets no baseline. Added with weight lambda to every token's advantage of the response, the step is the
gradient of lambda E[R] - D (docs/theory.md, "Outcome reward").
"""

from __future__ import annotations

import torch
from torch import Tensor


def leave_one_out_advantages(rewards: Tensor, groups: Tensor) -> Tensor:
    """[N] R_i - mean_{j != i, same group} R_j (R_i itself in a group of one). rewards [N] float, groups [N] ids."""
    _, group = torch.unique(groups, return_inverse=True)
    totals = torch.zeros(int(group.max()) + 1 if len(group) else 0, dtype=rewards.dtype,
                         device=rewards.device).index_add_(0, group, rewards)
    counts = torch.bincount(group).to(rewards.dtype)
    others = (counts[group] - 1).clamp(min=1)
    baseline = torch.where(counts[group] > 1, (totals[group] - rewards) / others, 0.0)
    return rewards - baseline
