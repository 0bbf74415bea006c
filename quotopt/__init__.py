"""quotopt: optimisation on the quotient manifolds created by parameter symmetries."""

from .optim import (
    NonFiniteStepError,
    QuotientAdam,
    QuotientMuon,
    QuotientSGD,
    RankDeficiencyWarning,
    SkippedStepWarning,
)
from .symmetries import describe, gauge_transform, symmetries, verify

__version__ = "0.1.0"

__all__ = [
    "NonFiniteStepError",
    "QuotientAdam",
    "QuotientMuon",
    "QuotientSGD",
    "RankDeficiencyWarning",
    "SkippedStepWarning",
    "__version__",
    "describe",
    "gauge_transform",
    "symmetries",
    "verify",
]
