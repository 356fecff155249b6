"""opdplus: on-policy distillation with correct f-divergence advantages."""

from opdplus.objective import Divergence, Objective, get_divergence, opd_loss, token_advantages

__all__ = ["Divergence", "Objective", "get_divergence", "token_advantages", "opd_loss"]
__version__ = "0.1.0"
