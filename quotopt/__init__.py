"""quotopt: optimisation on the quotient manifolds created by parameter symmetries."""

__version__ = "0.1.0"
