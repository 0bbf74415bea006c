"""The optimiser registry: one entry per optimiser read by every command, and a run that
detects the model's symmetries once."""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
import torch

from quotopt import symmetries
from quotopt.lab import training
from quotopt.lab.cli.args import optimizer_list
from quotopt.lab.cli.main import main
from quotopt.lab.study import protocol
from quotopt.lab.training import OPTIMIZERS, OptimizerSpec, optimizer_names
from quotopt.lab.training.loop import rebind

TINY = ["--task", "sort", "--size", "tiny", "--eval-every", "2", "--quiet", "--threads", "1"]


@pytest.fixture
def count_detections(monkeypatch):
    """Every call of ``quotopt.symmetries``, wherever a module imported it, is counted."""
    calls, original = [], symmetries

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    for name, module in list(sys.modules.items()):
        if name.startswith("quotopt") and getattr(module, "symmetries", None) is original:
            monkeypatch.setattr(module, "symmetries", counted)
    return calls


@pytest.mark.parametrize("optim", ["adamw", "qadam", "qadam-inv", "qmuon", "geoopt-stiefel"])
def test_a_train_run_detects_the_symmetries_once(tmp_path, count_detections, optim):
    assert main(["train", *TINY, "--optim", optim, "--steps", "2", "--out", str(tmp_path)]) == 0
    assert len(count_detections) == 1


def test_a_gauge_transformed_start_detects_once_too(count_detections):
    cfg = training.RunConfig("sort", optim="qsgd", size="tiny", steps=2, gauge_condition=10.0)
    training.train(cfg)
    assert len(count_detections) == 1


def test_the_relational_joint_group_probes_its_heads_apart(count_detections):
    """Documented exception: the relational model's default group joins the heads with its
    rotations, so the diagnostics detect the head groups alone (a second call)."""
    cfg = training.RunConfig("sort", optim="qadam", model="relational", size="tiny", steps=1)
    training.train(cfg)
    assert [c.get("residual") for c in count_detections] == [None, False]


def test_control_building_without_the_run_s_groups_detects_again(count_detections):
    model = training.build_model(training.build_task("sort", "tiny"), size="tiny")
    groups = training.detect("qadam", model)
    training.build_optimizer("qadam", model, groups=groups)
    assert len(count_detections) == 1
    training.build_optimizer("qadam", model)  # no groups given: the builder detects
    assert len(count_detections) == 2
    training.build_optimizer("adamw", model)  # a builder that reads no groups detects nothing
    assert len(count_detections) == 2


def test_the_study_s_tuples_derive_from_the_registry():
    full = [OPTIMIZERS[n] for n in optimizer_names("full")]
    assert protocol.ADAM_LIKE == tuple(e.name for e in full if e.family == "adam")
    assert protocol.SGD_LIKE == ("sgd", "qsgd")
    assert protocol.QUOTIENT == ("qadam", "qadam-inv", "qmuon")
    assert protocol.LABELS == {e.name: e.label for e in full}
    assert protocol.ROLES == {e.name: e.role for e in full}
    lora = "adamw qadam qadam-inv qmuon loraplus scaledgd qsgd-inv lora-rite balora qadam-mat "
    lora += "riemannion riemannion-mom"
    assert optimizer_names("lora") == tuple(lora.split())


def _toy(**changes) -> OptimizerSpec:
    def build(b):
        return torch.optim.SGD(b.model.parameters(), b.lr, weight_decay=b.weight_decay)

    fields = dict(
        name="toy-sgd",
        label="SGD without momentum",
        role="no geometry and no momentum: the plainest step there is.",
        family="sgd",
        quotient=False,
        build={"full": build},
        defaults={"*": (0.05, 0.0)},
    )
    return OptimizerSpec(**{**fields, **changes})


def test_one_entry_makes_an_optimiser_available_to_every_command(tmp_path, monkeypatch):
    monkeypatch.setitem(OPTIMIZERS, "toy-sgd", _toy())
    argv = ["train", *TINY, "--optim", "toy-sgd", "--steps", "2", "--out", str(tmp_path)]
    assert main(argv) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["config"]["lr"] == 0.05 and summary["config"]["optim"] == "toy-sgd"
    assert optimizer_list("adamw,toy-sgd") == ["adamw", "toy-sgd"]  # compare --optims
    plan = dataclasses.replace(protocol.QUICK.tasks[0], optims=("toy-sgd",))
    assert plan.grid("toy-sgd") == plan.sgd_grid
    with pytest.raises(Exception, match="unknown optimiser toy-sgd"):  # not for adapters
        optimizer_list("toy-sgd", "lora")


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(family="adamw"), "family"),
        (dict(build={}), "build"),
        (dict(build={"qlora": None}), "build"),
        (dict(defaults={}), "defaults"),
        (dict(secondary="beta"), "secondary"),
        (dict(role="no sentence"), "role"),
        (dict(metric="fisher"), "metric"),
    ],
)
def test_a_malformed_entry_is_refused_naming_the_field(change, field):
    _toy()  # the control: the same entry without the change is accepted
    with pytest.raises(ValueError, match=f"optimiser 'toy-sgd': {field} must be"):
        _toy(**change)


def test_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="'adamw' is registered already"):
        training.register_optimizer(_toy(name="adamw"))


def test_rebind_follows_a_replaced_parameter_by_name():
    model = training.build_model(training.build_task("sort", "tiny"), size="tiny")
    groups = training.detect("adamw", model)
    names = {id(p): n for n, p in model.named_parameters()}
    attn = model.blocks[0].attn
    old = attn.wq
    attn.wq = torch.nn.Parameter(old.detach().clone())  # as geoopt's Stiefel heads do
    held = [p for g in groups for p in g["params"]]
    assert any(p is old for p in held) and not any(p is attn.wq for p in held)  # the control
    again = [p for g in rebind(groups, model, names) for p in g["params"]]
    assert any(p is attn.wq for p in again) and not any(p is old for p in again)
