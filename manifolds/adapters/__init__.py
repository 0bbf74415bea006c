"""Adapters that expose a ``manifolds.Bundle``'s quotient to other Riemannian libraries.

* ``manifolds.adapters.geoopt.GeooptManifold`` — a ``geoopt.Manifold`` (one flat
  ``ManifoldParameter`` per bundle point), for geoopt's ``RiemannianSGD`` / ``RiemannianAdam``;
* ``manifolds.adapters.pymanopt.PymanoptManifold`` — a ``pymanopt`` manifold (points are tuples
  of numpy arrays), for pymanopt's solvers, with the exact Riemannian Hessian.

geoopt and pymanopt are optional extras (``pip install quotopt[interop]``). This package imports
neither: each submodule imports its library when the submodule itself is imported, which the
attribute access ``manifolds.adapters.GeooptManifold`` does on first use.
"""

from __future__ import annotations

import importlib

__all__ = ["GeooptManifold", "PymanoptManifold"]

_LAZY = {"GeooptManifold": ".geoopt", "PymanoptManifold": ".pymanopt"}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
