"""quotopt: optimisation on the quotient manifolds created by parameter symmetries."""

from ._startup import handle_interrupts_while_starting, is_command

if is_command():  # the console command: Ctrl-C while torch loads is one line, not a traceback
    handle_interrupts_while_starting()

from .groups import describe, gauge_transform, symmetries, verify
from .optim import (
    NonFiniteStepError,
    QuotientAdam,
    QuotientMuon,
    QuotientSGD,
    RankDeficiencyWarning,
    SkippedStepWarning,
)

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
