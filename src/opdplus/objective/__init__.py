"""The objective: f-divergences, per-token OPD / OPD+ advantages, the policy-gradient loss. Tensors in, tensors
out: nothing here knows about models, processes or files."""

from opdplus.objective.advantages import ESTIMATORS, token_advantages
from opdplus.objective.divergences import Divergence, get_divergence
from opdplus.objective.loss import opd_loss
from opdplus.objective.objective import Objective, parse_estimator

__all__ = ["Divergence", "ESTIMATORS", "Objective", "get_divergence", "opd_loss", "parse_estimator", "token_advantages"]
