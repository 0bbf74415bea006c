"""Every bundle the tests know, in one list: the conformance matrix (``test_bundles``), the
interface checks (``test_interface``) and the optimisers' gauge-equivariance tests
(``test_optim``) all read ``CASES``.

A new bundle's tests are one ``Case`` here: a name, fixed small instances (``examples``, each
a function of nothing), a hypothesis strategy over its sizes and metrics (``draw``, for the
conformance matrix) and whether it is *factored* (two factors per head acted on by
(A g, B g⁻ᵀ), g in a subgroup of GL(r): what QuotientMuon and the balance gap need). A bundle
that a new detector proposes also names a module holding its point and the detector
(``detect``): ``tests/groups/test_groups_registry.py``'s ``check_detection`` registers it, runs
``quotopt.symmetries`` and unregisters it. ``tests/test_cases.py`` shows a toy bundle going
through every check, detection included, by being one case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from hypothesis import strategies as st

import manifolds as M


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    examples: tuple[Callable[[], M.Bundle], ...]
    draw: Callable[[], st.SearchStrategy] | None = None
    factored: bool = False
    composable: bool = True  # may be a component of a ProductBundle in the conformance matrix
    # () -> (a model holding the bundle's point, a quotopt.groups.Detector that proposes it)
    detect: Callable[[], tuple] | None = None


@st.composite
def _heads(draw, cls):
    d = draw(st.integers(1, 7))
    r = draw(st.integers(1, d))
    return cls(draw(st.integers(1, 3)), d, r, metric=draw(st.sampled_from(M.METRICS)))


@st.composite
def _rotary(draw):
    d_head = 2 * draw(st.integers(1, 3))
    d = draw(st.integers(d_head, 8))
    return M.RotaryQK(
        draw(st.integers(1, 3)),
        d,
        d_head,
        metric=draw(st.sampled_from(M.METRICS)),
        pairing=draw(st.sampled_from(["half", "interleaved"])),
    )


@st.composite
def _residual(draw):
    d = draw(st.integers(1, 6))
    shapes, axes = [], []
    for _ in range(draw(st.integers(1, 3))):
        ndim = draw(st.integers(1, 3))
        shape = [draw(st.integers(1, 4)) for _ in range(ndim)]
        axis = draw(st.integers(0, ndim - 1))
        shape[axis] = d
        shapes.append(tuple(shape))
        axes.append(axis if draw(st.booleans()) else axis - ndim)  # negative axes too
    return M.ResidualRotation(d, axes, shapes=shapes)


@st.composite
def _rescaling(draw):
    return M.PositiveRescaling(
        draw(st.integers(1, 4)),
        draw(st.integers(1, 5)),
        draw(st.integers(1, 5)),
        metric=draw(st.sampled_from(M.METRICS)),
        degree=draw(st.sampled_from([1, 2])),
    )


def joint(d: int = 6, h: int = 2, r: int = 3, metric: str = "euclidean") -> M.JointBundle:
    """O(d) on an embedding (V, d), a head pair's factors (H, d, r) and an output map (H, r, d),
    jointly with GL(r) per head on the pair (W_q, W_k)."""
    shapes = ((5, d), (h, d, r), (h, d, r), (h, r, d))
    residual = M.ResidualRotation(d, (1, 1, 1, 2), shapes=shapes)
    return M.JointBundle(residual, [(M.HeadQK(h, d, r, metric), (1, 2))])


@st.composite
def _joint(draw):
    d = draw(st.integers(2, 6))
    r = draw(st.integers(1, d))
    return joint(d, draw(st.integers(1, 2)), r, draw(st.sampled_from(M.METRICS)))


CASES: list[Case] = [
    Case(
        "HeadQK",
        (
            lambda: M.HeadQK(3, 6, 2),
            lambda: M.HeadQK(2, 5, 3, metric="invariant", factor_rows=(6, 5)),
        ),
        lambda: _heads(M.HeadQK),
        factored=True,
    ),
    Case(
        "HeadOV",
        (
            lambda: M.HeadOV(2, 6, 3, factor_rows=(7, 6)),
            lambda: M.HeadOV(2, 5, 2, metric="invariant"),
        ),
        lambda: _heads(M.HeadOV),
        factored=True,
    ),
    Case(
        "PositiveRescaling",
        (
            lambda: M.PositiveRescaling(4, 3, 5),
            lambda: M.PositiveRescaling(3, 4, 2, metric="invariant"),
            lambda: M.PositiveRescaling(3, 5, 2, metric="invariant", degree=2),
        ),
        _rescaling,
        factored=True,
    ),
    Case(
        "RotaryQK",
        (
            lambda: M.RotaryQK(2, 6, 4, pairing="half"),
            lambda: M.RotaryQK(
                2, 6, 4, metric="invariant", pairing="interleaved", factor_rows=(12, 6)
            ),
        ),
        _rotary,
        factored=True,
    ),
    Case(
        "ResidualRotation",
        (lambda: M.ResidualRotation(4, axes=(1, 0), shapes=((5, 4), (4, 3))),),
        _residual,
    ),
    Case(
        "ProductBundle",
        (lambda: M.ProductBundle([M.HeadQK(2, 5, 2), M.PositiveRescaling(3, 4, 4)]),),
    ),
    Case("JointBundle", (joint, lambda: joint(5, 2, 2, "invariant")), _joint, composable=False),
]


def examples(*, factored: bool | None = None, cases: list[Case] | None = None) -> list:
    """``pytest.param`` of every example of ``cases`` (default ``CASES``), the factored ones or
    the others when ``factored`` is given; ids are the bundles' reprs."""
    import pytest

    out = []
    for case in CASES if cases is None else cases:
        if factored is None or case.factored == factored:
            for make in case.examples:
                bundle = make()
                out.append(pytest.param(bundle, id=repr(bundle)))
    return out


def strategy(cases: list[Case] | None = None) -> st.SearchStrategy:
    """Bundles drawn from every case with a ``draw``, and products of the composable ones."""
    cases = CASES if cases is None else cases
    single = [case.draw() for case in cases if case.draw is not None]
    parts = [case.draw() for case in cases if case.draw is not None and case.composable]
    products = st.lists(st.one_of(parts), min_size=1, max_size=3).map(M.ProductBundle)
    return st.one_of(*single, products)
