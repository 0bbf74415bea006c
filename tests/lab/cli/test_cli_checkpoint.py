"""A checkpoint's fields are checked before a resume uses them: a wrong type or range is one
line naming the field, its value and the rule, and nothing in the run directory changes; a
resumed optimiser's groups are the fresh ones'."""

from __future__ import annotations

import math

import pytest
import torch

from quotopt.lab import training
from quotopt.lab.cli.main import main

TINY = ["--task", "sort", "--size", "tiny", "--eval-every", "2", "--quiet", "--threads", "1"]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _train(out, steps, *extra):
    return main(["train", *TINY, "--steps", str(steps), "--out", str(out), *extra])


def _files(out):
    return {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}


@pytest.mark.parametrize(
    ("field", "value", "rule"),
    [
        ("step", 1.5, "an integer >= 0"),
        ("step", -5, "an integer >= 0"),
        ("step", True, "an integer >= 0"),
        ("step", "x", "an integer >= 0"),
        ("threads", "1", "None or an integer >= 1"),
        ("threads", 0, "None or an integer >= 1"),
        ("clock", {"wall": math.nan, "train": 0.0}, "finite seconds >= 0"),
        ("clock", {"wall": 1.0}, "finite seconds >= 0"),
        ("data_rng", torch.zeros(3), "a 1-D uint8 tensor"),
        ("config", [], "a dict of run settings"),
        ("model", {"w": 1.0}, "a dict of tensors"),
        ("optimizer", {"state": {}}, "'param_groups'"),
    ],
)
def test_a_bad_checkpoint_field_is_one_line_and_changes_nothing(
    tmp_path, capsys, field, value, rule
):
    assert _train(tmp_path, 2) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    ckpt[field] = value
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    before = _files(tmp_path)
    capsys.readouterr()
    assert _train(tmp_path, 4, "--resume") == 1
    err = capsys.readouterr().err
    assert err.startswith("quotopt: error: checkpoint ") and err.count("\n") == 1, err
    assert f"has {field} = {value!r}"[:40] in err and f"{field} must be" in err and rule in err
    assert "internal error" not in err
    assert _files(tmp_path) == before


def test_the_control_an_untouched_checkpoint_resumes(tmp_path, capsys):
    assert _train(tmp_path, 2) == 0
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    torch.save(ckpt, tmp_path / "checkpoint.pt")  # the same fields, written again
    assert _train(tmp_path, 4, "--resume") == 0
    assert [r["step"] for r in training.read_records(tmp_path)] == [0, 2, 4]


@pytest.mark.parametrize("optim", ["adamw", "qadam", "qmuon"])
def test_a_resumed_optimizer_has_the_fresh_groups(optim):
    task = training.build_task("sort", "tiny", 0)
    model = training.build_model(task, "transformer", "tiny")

    def fresh():
        return training.build_optimizer(optim, model, 1e-3, 0.1, (0.9, 0.98), "sort")

    trained = fresh()
    x, y = task.batch("train", 4, generator=torch.Generator().manual_seed(0))
    task.loss(task.logits(model, x), y).backward()
    trained.step()
    resumed = fresh()
    resumed.load_state_dict(trained.state_dict())
    for new, old in zip(fresh().param_groups, resumed.param_groups, strict=True):
        assert new.keys() == old.keys(), (new["name"], set(new) ^ set(old))
        assert new.get("bundle") is old.get("bundle") or repr(new["bundle"]) == repr(old["bundle"])
