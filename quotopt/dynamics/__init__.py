"""Training-dynamics tools that return data (never plot, never print).

* ``hessian``: Hessian–vector products, the dense Hessian of small models, Lanczos extremes;
* ``flat``: vertical/horizontal bases and the symmetry-induced flat directions of a Hessian;
* ``model_flat``: the same for a whole model's training objective, with or without decay;
* ``refine``, ``refine_krylov``: a trained point moved to a true critical point (dense Newton,
  or matrix-free Newton–MINRES above the dense size), and the counts there;
* ``conserved``: gradient-flow invariants (per-head imbalance) and gauge coordinates (distance
  to the balanced section modulo its compact stabiliser, balance gap, drift to the dressing).
"""

from .conserved import balance_gap, gauge_drift, head_imbalance, section_distance
from .flat import (
    FlatReport,
    algebra_basis,
    analyse_flat_directions,
    flat_directions,
    horizontal_basis,
    orbit_dimension,
    vertical_basis,
)
from .hessian import (
    dense_hessian,
    flatten,
    hessian_operator,
    hvp,
    lanczos_extremes,
    unflatten,
)
from .model_flat import compact_orbit_dimension, model_flat_directions, model_vertical_basis

__all__ = [
    "FlatReport",
    "algebra_basis",
    "analyse_flat_directions",
    "balance_gap",
    "compact_orbit_dimension",
    "dense_hessian",
    "flat_directions",
    "flatten",
    "gauge_drift",
    "head_imbalance",
    "hessian_operator",
    "horizontal_basis",
    "hvp",
    "lanczos_extremes",
    "model_flat_directions",
    "model_vertical_basis",
    "orbit_dimension",
    "section_distance",
    "unflatten",
    "vertical_basis",
]
