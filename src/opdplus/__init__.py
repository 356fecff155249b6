"""opdplus: on-policy distillation with correct f-divergence advantages."""

from opdplus.advantages import token_advantages
from opdplus.divergences import Divergence, get_divergence
from opdplus.losses import opd_loss

__all__ = ["Divergence", "get_divergence", "token_advantages", "opd_loss"]
__version__ = "0.1.0"
