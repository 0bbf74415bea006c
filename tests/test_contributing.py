"""The optimiser of docs/contributing.md ("Adding an optimiser"), written against the declared
hooks of ``quotopt.optim.protocol.UpdateRule``, is what the page says: gauge-equivariant on
every bundle of ``tests/cases.py`` (float64, 30 steps from p and p·g, orbit gap ≤ 1e-8), with
controls that fail — the same rule on raw tensors, and undressed under the Euclidean metric;
and a subclass that leaves out a hook cannot be built."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import manifolds as M
from manifolds.testing import relative_error
from quotopt.optim import QuotientOptimizer
from tests.cases import examples
from tests.test_docs_snippets import blocks

PAGE = Path(__file__).resolve().parents[1] / "docs" / "contributing.md"


def _walkthrough() -> dict:
    """The namespace of the page's block that defines the optimiser, as the page defines it."""
    page = blocks(PAGE.read_text(), "contributing.md")
    first = next(b for b in page if "class QuotientNormalisedSGD" in b.code)
    namespace: dict = {"__name__": "contributing"}
    exec(compile(first.code, first.where, "exec"), namespace)
    return namespace


OPTIMISER = _walkthrough()["QuotientNormalisedSGD"]


def _end_invariants(bundle, start, make, steps=30):
    params = [torch.nn.Parameter(t.clone()) for t in start]
    gen = torch.Generator().manual_seed(5)
    targets = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in bundle.invariants(start)]
    optimiser = make(params)
    for _ in range(steps):
        optimiser.zero_grad()
        loss = sum(((i - t) ** 2).mean() for i, t in zip(bundle.invariants(params), targets))
        loss.backward()
        optimiser.step()
    return bundle.invariants(tuple(p.detach() for p in params))


def _orbit_gap(bundle, make) -> float:
    gen = torch.Generator().manual_seed(1)
    p = bundle.random_point(generator=gen, dtype=torch.float64)
    g = bundle.random_group_element(generator=gen, dtype=torch.float64, condition=10.0)
    end_p = _end_invariants(bundle, p, make)
    end_q = _end_invariants(bundle, bundle.act(p, g), make)
    return relative_error(end_q, end_p)


def _on_quotient(bundle, **options):
    return lambda params: OPTIMISER([{"params": params, "bundle": bundle}], lr=1e-2, **options)


@pytest.mark.parametrize("bundle", examples())
def test_the_walkthrough_optimiser_is_gauge_equivariant(bundle):
    assert _orbit_gap(bundle, _on_quotient(bundle)) <= 1e-8


@pytest.mark.parametrize("bundle", [M.HeadQK(2, 6, 2), M.HeadQK(2, 6, 2, metric="invariant")])
def test_control_the_same_rule_on_raw_tensors_is_not(bundle):
    assert _orbit_gap(bundle, lambda params: OPTIMISER(params, lr=1e-2)) > 1e-3


def test_control_undressed_under_the_euclidean_metric_is_not():
    bundle = M.HeadQK(2, 6, 2)
    assert _orbit_gap(bundle, _on_quotient(bundle, dress_every=None)) > 1e-3


def test_a_subclass_without_every_hook_cannot_be_built():
    hooks = {"_bundle_update", "_check_hyperparameters", "_hyperparameters", "_init_state"}
    hooks.add("_plain_update")
    assert set(QuotientOptimizer.__abstractmethods__) == hooks
    param = torch.nn.Parameter(torch.zeros(3))
    for missing in sorted(hooks):
        members = {k: vars(OPTIMISER)[k] for k in hooks - {missing}}
        partial = type("Partial", (QuotientOptimizer,), members)
        with pytest.raises(TypeError, match=missing):
            partial([param], {"dress_every": None})
    OPTIMISER([param])  # the control: with every hook it builds


def test_state_dict_round_trip_of_the_walkthrough_optimiser(tmp_path):
    bundle = M.HeadQK(2, 6, 2)
    point = bundle.random_point(generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    params = [torch.nn.Parameter(t.clone()) for t in point]
    optimiser = OPTIMISER([{"params": params, "bundle": bundle}], lr=1e-2)
    sum((i**2).sum() for i in bundle.invariants(params)).backward()
    optimiser.step()
    torch.save(optimiser.state_dict(), tmp_path / "state.pt")
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    other = OPTIMISER([{"params": params, "bundle": bundle}], lr=1e-2)
    other.load_state_dict(loaded)
    assert float(other.state[params[0]]["step"]) == 1.0
