"""Pure geometry of parameter symmetries: principal bundles, their metrics and dressing fields.

``manifolds`` knows nothing of optimisers or models: it depends on torch alone (numpy/scipy
where needed) and is usable on its own.
"""

from .base import AMBIGUITY_TOLERANCE, Bundle, Point, Tangent, checks_enabled, unchecked
from .factored import STATISTIC_KINDS, FactoredBundle, FactorFrame
from .frame import Frame
from .heads import METRICS, GeneralLinearPair, HeadOV, HeadQK
from .joint import JointBundle
from .product import ProductBundle
from .rescaling import PositiveRescaling
from .residual import ResidualRotation
from .rotary import RotaryQK

__all__ = [
    "AMBIGUITY_TOLERANCE",
    "Bundle",
    "FactoredBundle",
    "FactorFrame",
    "Frame",
    "GeneralLinearPair",
    "HeadOV",
    "HeadQK",
    "JointBundle",
    "METRICS",
    "Point",
    "PositiveRescaling",
    "ProductBundle",
    "ResidualRotation",
    "STATISTIC_KINDS",
    "RotaryQK",
    "Tangent",
    "checks_enabled",
    "unchecked",
]
