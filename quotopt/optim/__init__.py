"""Quotient optimisers: pure update functions under thin ``torch.optim.Optimizer`` shells."""

from .adam import QuotientAdam
from .base import NonFiniteStepError, QuotientOptimizer, RankDeficiencyWarning, SkippedStepWarning
from .muon import QuotientMuon
from .sgd import QuotientSGD

__all__ = [
    "NonFiniteStepError",
    "QuotientAdam",
    "QuotientMuon",
    "QuotientOptimizer",
    "QuotientSGD",
    "RankDeficiencyWarning",
    "SkippedStepWarning",
]
