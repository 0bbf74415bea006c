"""The study pipeline end to end on a micro plan (in-process), its selection rule and plans."""

from __future__ import annotations

import math

import pytest

from quotopt.cli.main import main
from quotopt.study import FULL, QUICK, n_runs, run_study, write_report
from quotopt.study.protocol import FlatPlan, Grid, RelationalPlan, StudyPlan, TaskPlan, score
from quotopt.training import OPTIMIZERS


def test_score_orders_runs_by_the_task_criterion():
    fast = dict(steps_to_target=200, final_val_loss=0.5, final=1.0)
    slow = dict(steps_to_target=400, final_val_loss=0.1, final=1.0)
    never = dict(steps_to_target=None, final_val_loss=0.01, final=0.5)
    assert sorted([never, slow, fast], key=lambda s: score(s, "steps")) == [fast, slow, never]
    assert score(None, "loss") == (math.inf, math.inf)
    assert score(dict(final_val_loss=None), "loss") == (math.inf,)
    assert score(slow, "accuracy") < score(never, "accuracy")


@pytest.mark.parametrize("plan", [QUICK, FULL])
def test_plans_name_registered_optimisers_and_tune_every_one(plan):
    for t in plan.tasks:
        assert set(t.optims) <= set(OPTIMIZERS)
        assert "adamw" in t.optims and t.tune_seed in t.seeds and len(t.seeds) >= 3
        for optim in t.optims:
            grid = t.grid(optim)
            assert len(grid.lrs) >= 2 and len(grid.weight_decays) >= 2  # decay is tuned too
    assert {t.task for t in plan.tasks} == {"modadd", "sort", "chars", "digits"}
    assert "grokfast" in next(t for t in plan.tasks if t.task == "modadd").optims


def _micro_plan() -> StudyPlan:
    grid, sgd = Grid((1e-3, 3e-3), (0.1,)), Grid((0.1,), (0.0,))
    # fmt: off
    return StudyPlan(
        name="micro",
        tasks=(
            TaskPlan("modadd", "tiny", 20, ("adamw", "qadam", "sgd"), grid, sgd, "steps",
                     eval_every=10, seeds=(0, 1), stop_at_target=True),
            TaskPlan("sort", "tiny", 10, ("adamw", "qadam"), grid, sgd, "steps", eval_every=5,
                     seeds=(0, 1)),
        ),
        relational=RelationalPlan("sort", "tiny", 10, eval_every=5, seeds=(0,)),
        flat=FlatPlan("tiny", 30, lr=3e-3, weight_decays=(0.0, 1e-2)),
    )
    # fmt: on


def test_micro_study_writes_a_page_from_its_runs(tmp_path):
    plan, done = _micro_plan(), []
    results = run_study(plan, tmp_path / "runs", workers=0, on_done=done.append)
    assert len(done) == n_runs(plan)
    modadd = results["tasks"]["modadd"]
    assert len(modadd["tuning"]["adamw"]) == 2 and len(modadd["runs"]["qadam"]) == 2
    best = modadd["best"]["adamw"]
    tuned = {(t["lr"], t["weight_decay"]): t["summary"] for t in modadd["tuning"]["adamw"]}
    assert score(tuned[tuple(best)], "steps") == min(score(s, "steps") for s in tuned.values())
    # the tuning seed's run at the best setting is reused, not trained again
    seed0 = modadd["runs"]["adamw"][0]["summary"]
    assert seed0 == tuned[tuple(best)]
    flat = results["flat"]
    assert [f["objective_weight_decay"] for f in flat] == [0.0, 1e-2]
    assert all(f["orbit_dim"] == 80 and f["compact_orbit_dim"] == 24 for f in flat)

    page = write_report(results, tmp_path / "docs", "quotopt study --micro")
    text = page.read_text()
    for heading in ("## Targets", "## modadd", "## sort", "## Flat directions", "## Gauge"):
        assert heading in text
    assert "QuotientAdam ≤ 0.5× AdamW's steps" in text
    for name in ("modadd", "sort", "relational", "flat", "dynamics"):
        assert (tmp_path / "docs" / "img" / "results" / f"{name}.png").read_bytes()[:4] == (
            b"\x89PNG"
        )

    # resume reuses every finished run
    again = []
    run_study(plan, tmp_path / "runs", workers=0, resume=True, on_done=again.append)
    assert [r.get("summary") for r in again] == [r.get("summary") for r in done]


def test_study_command_rejects_both_modes(capsys):
    assert main(["study", "--quick", "--full"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_report_only_needs_a_saved_study(tmp_path, capsys):
    assert main(["study", "--out", str(tmp_path), "--report-only"]) == 1
    assert "no " in capsys.readouterr().err


def test_a_diverged_run_ranks_after_every_finished_one():
    never = dict(steps_to_target=None, final_val_loss=2.0, final=0.1, diverged=None)
    # refused a non-finite step after reaching the target: its last numbers are finite
    blown = dict(steps_to_target=100, final_val_loss=0.1, final=1.0,
                 diverged=dict(step=150, reason="NonFiniteStepError"))  # fmt: skip
    for criterion in ("steps", "loss", "accuracy"):
        assert sorted([blown, never], key=lambda s: score(s, criterion)) == [never, blown]


def test_study_needs_resume_or_force_over_an_earlier_study(tmp_path, capsys):
    (tmp_path / "study.json").write_text("{}")
    assert main(["study", "--out", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "already holds a run (study.json)" in err and err.count("\n") == 1
    assert (tmp_path / "study.json").read_text() == "{}"  # untouched
