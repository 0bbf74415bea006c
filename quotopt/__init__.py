"""quotopt: optimisation on the quotient manifolds created by parameter symmetries."""

from .optim import NonFiniteStepError, QuotientAdam, QuotientSGD

__version__ = "0.1.0"

__all__ = ["NonFiniteStepError", "QuotientAdam", "QuotientSGD", "__version__"]
