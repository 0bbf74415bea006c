"""The detector registry of ``quotopt.groups`` and the entries a layout reads.

* A detector registered in a test becomes part of ``quotopt.symmetries``' walk (its candidate is
  verified like any other, and a wrong one is rejected: the control), ``before=`` puts it ahead
  of a built-in one, and unregistering it restores the result exactly.
* ``Layout.entries(shapes)`` is index arithmetic; its oracle here is the label tensor pushed
  through the layout (float64 labels, exact up to 2⁵³ entries). Control: the same comparison
  with the feature axis flipped (``transposed``) fails.
* The package never imports the models or the laboratory, even inside a function (control: a
  planted dependency is found).
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import manifolds as M
import quotopt
from quotopt.groups import Detector, Option, Slot, register, registered, unregister
from quotopt.groups.layouts import (
    ComposedLayout,
    MultiheadAttentionHeads,
    ProjectionHeads,
    Rows,
    UnitsOfMatmul,
    feature_blocks,
)
from tests.test_layout import import_graph

F64 = torch.float64
LABORATORY = ("training", "study", "finetune", "baselines", "cli", "plotting", "models")


@contextlib.contextmanager
def registered_detector(detector: Detector, before: str | None = None):
    """``detector`` in the registry for the duration of the block, removed after."""
    register(detector, before=before)
    try:
        yield detector
    finally:
        unregister(detector.name)


def _quiet_symmetries(model, **kwargs):
    with warnings.catch_warnings():  # "found no symmetry": the assertions say what was found
        warnings.simplefilter("ignore", UserWarning)
        return quotopt.symmetries(model, **kwargs)


def _bundle_names(model) -> list[str]:
    return [g["name"] for g in _quiet_symmetries(model) if g.get("bundle") is not None]


def check_detection(case, tolerance: float = 1e-10) -> None:
    """``case.detect()`` gives (model, detector): registered, ``symmetries`` returns one group
    whose bundle is of the case's type, verified to change the output by at most ``tolerance``;
    unregistered, the groups are what they were."""
    model, detector = case.detect()
    before = _bundle_names(model)
    with registered_detector(detector):
        groups, report = _quiet_symmetries(model, report=True)
    found = [g for g in groups if type(g.get("bundle")).__name__ == case.name]
    assert len(found) == 1, str(report)
    (row,) = [f for f in report.findings if f.group == found[0]["name"]]
    assert row.source == "detected" and row.change is not None and row.change <= tolerance
    after = _bundle_names(model)
    assert after == before and found[0]["name"] not in after


# ---- a detector for a module no built-in detector knows -----------------------------------
class MatmulMLP(nn.Module):
    """relu(x @ w_in) @ w_out with w_in (d, m), w_out (m, d_out): units rescale positively."""

    def __init__(self, d: int = 6, m: int = 5, activation=torch.relu):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w_in = nn.Parameter(torch.randn(d, m, generator=gen, dtype=F64))
        self.w_out = nn.Parameter(torch.randn(m, d, generator=gen, dtype=F64))
        self.activation = activation

    def forward(self, x):
        return self.activation(x @ self.w_in) @ self.w_out


def find_units(path, module, request):
    if not isinstance(module, MatmulMLP) or not request.rescaling:
        return []
    (d, m), d_out = module.w_in.shape, module.w_out.shape[1]
    group = {
        "params": [module.w_in, module.w_out],
        "bundle": M.PositiveRescaling(m, d, d_out, request.metric),
        "layout": UnitsOfMatmul(),
        "name": f"{path}units",
    }
    probe = lambda gen: ((torch.randn(3, d, generator=gen, dtype=F64),), {})  # noqa: E731
    option = Option(group, "positive rescaling per unit")
    return [Slot(module, path, "mlp", "units", [option], probe=probe, family="MatmulMLP")]


def _model(activation=torch.relu):
    return nn.Sequential(MatmulMLP(activation=activation), nn.Linear(6, 2, dtype=F64))


def test_a_registered_detector_is_walked_and_unregistering_restores_the_result():
    model = _model()
    with pytest.warns(UserWarning, match="found no symmetry"):
        alone = quotopt.symmetries(model)
    assert [g["name"] for g in alone] == ["plain"]
    with registered_detector(Detector("matmul-mlp", find_units)):
        assert "matmul-mlp" in [d.name for d in registered()]
        groups, report = quotopt.symmetries(model, report=True)
    assert [g["name"] for g in groups] == ["0.units", "plain"]
    assert isinstance(groups[0]["bundle"], M.PositiveRescaling)
    (row,) = [f for f in report.findings if f.group == "0.units"]
    assert row.change is not None and row.change <= 1e-12
    assert "matmul-mlp" not in [d.name for d in registered()]
    with pytest.warns(UserWarning, match="found no symmetry"):
        again = quotopt.symmetries(model)
    assert [g["name"] for g in again] == ["plain"]


def test_a_wrong_candidate_of_a_registered_detector_is_rejected():
    """The control: the same detector on a GELU MLP proposes a rescaling that is no symmetry;
    the check rejects it and the report says by how much it changed the output."""
    model = _model(nn.functional.gelu)
    with registered_detector(Detector("matmul-mlp", find_units)):
        with pytest.warns(UserWarning, match="found no symmetry"):
            groups, report = quotopt.symmetries(model, report=True)
    assert [g["name"] for g in groups] == ["plain"]
    (row,) = [f for f in report.findings if f.path == "0"]
    assert "positive rescaling per unit: change" in row.note


def test_before_puts_a_detector_ahead_of_a_built_in_one():
    mha = nn.MultiheadAttention(8, 2, dtype=F64)

    def nothing_but_a_note(path, module, request):
        if not isinstance(module, nn.MultiheadAttention):
            return []
        return [Slot(module, path, "attention", "heads", note="claimed by the test")]

    with registered_detector(Detector("first", nothing_but_a_note), before="torch.nn"):
        names = [d.name for d in registered()]
        assert names.index("first") == names.index("torch.nn") - 1
        with pytest.warns(UserWarning, match="found no symmetry"):
            groups, report = quotopt.symmetries(mha, report=True)
    assert [g["name"] for g in groups] == ["plain"]
    assert any(f.note == "claimed by the test" for f in report.findings)
    assert [g["name"] for g in quotopt.symmetries(mha)] == ["heads", "plain"]  # built-in again


def test_the_registry_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="'torch.nn' is already registered"):
        register(Detector("torch.nn", find_units))
    with pytest.raises(ValueError, match="before='nowhere' names no registered detector"):
        register(Detector("new", find_units), before="nowhere")
    with pytest.raises(ValueError, match="no detector named 'nowhere'"):
        unregister("nowhere")
    assert [d.name for d in registered()] == ["model", "torch.nn", "lora", "huggingface"]


# ---- Layout.entries against the labels the layout gathers --------------------------------
def _labels_read(layout, shapes) -> dict[int, set[int]]:
    """The oracle: float64 labels pushed through the layout, mapped back to (position, entry)."""
    sizes = [int(torch.tensor(s).prod()) for s in shapes]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    labels = [torch.arange(o, o + n, dtype=F64).view(s) for o, n, s in zip(offsets, sizes, shapes)]
    read: dict[int, set[int]] = {}
    for value in torch.cat([t.reshape(-1) for t in layout(labels)]).long().tolist():
        position = max(i for i, o in enumerate(offsets) if o <= value)
        read.setdefault(position, set()).add(value - offsets[position])
    return read


def _entries_read(layout, shapes) -> dict[int, set[int]]:
    out = {}
    for position, index in layout.entries(shapes).items():
        every = range(int(torch.tensor(shapes[position]).prod()))
        out[position] = set(every) if index is None else set(index.tolist())
    return out


def _layouts():
    h, r, d = 3, 2, 7
    qk = ProjectionHeads(
        [Rows(0, feature_blocks(0, h, 1, r), bias=1), Rows(0, feature_blocks(h * r, h, 1, r))]
    )
    gqa = ProjectionHeads(  # grouped-query: k = 2 query blocks per key head, Conv1D storage
        [Rows(0, feature_blocks(0, 2, 2, r), transposed=True), Rows(1, feature_blocks(2, 2, 1, r))]
    )
    ov = ProjectionHeads([Rows(2, feature_blocks(0, h, 1, r), transposed=True, writes=True)])
    expert, unit = torch.arange(2).repeat_interleave(3), torch.arange(3).repeat(2)
    experts = ProjectionHeads(
        [
            Rows(0, (expert.view(-1, 1, 1), unit.view(-1, 1, 1) + 3)),
            Rows(1, (expert.view(-1, 1, 1), unit.view(-1, 1, 1)), transposed=True),
        ]
    )
    composed = ComposedLayout([(qk, (0, 1), 2), (ov, (0, 1, 2), 1), (None, (3,), 1)])
    return [
        ("qk with bias", qk, [(3 * h * r, d), (3 * h * r,)]),
        ("grouped-query, Conv1D", gqa, [(d, 2 * 2 * r), (2 * 2 * r, d)]),
        ("experts (3-D)", experts, [(2, 6, d), (2, d, 3)]),
        (
            "packed nn.MultiheadAttention",
            MultiheadAttentionHeads(6, 3, True),
            [(18, 6), (18,), (6, 6)],
        ),
        ("composed", composed, [(3 * h * r, d), (3 * h * r,), (d, h * r), (4, 5)]),
    ]


@pytest.mark.parametrize("name, layout, shapes", _layouts(), ids=[c[0] for c in _layouts()])
def test_entries_are_the_entries_the_layout_reads(name, layout, shapes):
    assert _entries_read(layout, shapes) == _labels_read(layout, shapes)


def test_entries_tell_the_feature_axis_apart():
    """The control: the same index on the other axis reads other entries."""
    rows = Rows(0, feature_blocks(0, 2, 1, 2))
    flipped = Rows(0, feature_blocks(0, 2, 1, 2), transposed=True)
    shapes = [(5, 5)]
    assert _entries_read(ProjectionHeads([rows]), shapes) != _labels_read(
        ProjectionHeads([flipped]), shapes
    )


# ---- the package's dependencies -------------------------------------------------------------
def _reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def forbidden_imports(graph, package: str, forbidden: list[str]) -> dict[str, list[str]]:
    """{module of ``package``: the ``forbidden`` modules it reaches through imports}."""
    out = {}
    for name in graph:
        if name == package or name.startswith(package + "."):
            bad = sorted(t for t in _reaches(graph, name) if t.startswith(tuple(forbidden)))
            if bad:
                out[name] = bad
    return out


def test_the_groups_package_imports_neither_models_nor_the_laboratory():
    graph = import_graph()
    assert {"quotopt.groups.pipeline", "quotopt.groups.detectors.hf"} <= set(graph)
    forbidden = [f"quotopt.{name}" for name in LABORATORY] + ["quotopt.optim"]
    assert forbidden_imports(graph, "quotopt.groups", forbidden) == {}


def test_a_planted_upward_import_is_found(tmp_path: Path):
    """The control: ``lib.b`` imports ``lab`` inside a function, through ``lib.a``."""
    package = tmp_path / "pkg"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "lab.py").write_text("X = 1\n")
    (package / "lib" / "__init__.py").write_text("")
    (package / "lib" / "a.py").write_text("from . import b\n")
    (package / "lib" / "b.py").write_text("def f():\n    from ..lab import X\n    return X\n")
    graph = import_graph(tmp_path, ("pkg",))
    found = forbidden_imports(graph, "pkg.lib", ["pkg.lab"])
    assert found == {"pkg.lib.a": ["pkg.lab"], "pkg.lib.b": ["pkg.lab"]}
