"""Quotient optimisers: one module per optimiser (its class, pure updates and typed state)
under the shell of ``quotopt.optim.base``, whose hooks ``quotopt.optim.protocol`` declares."""

from .adam import QuotientAdam
from .base import NonFiniteStepError, QuotientOptimizer, RankDeficiencyWarning, SkippedStepWarning
from .muon import QuotientMuon
from .protocol import UpdateRule
from .sgd import QuotientSGD

__all__ = [
    "NonFiniteStepError",
    "QuotientAdam",
    "QuotientMuon",
    "QuotientOptimizer",
    "QuotientSGD",
    "RankDeficiencyWarning",
    "SkippedStepWarning",
    "UpdateRule",
]
