"""The study pipeline end to end on a micro plan (in-process), its selection rule and plans."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from quotopt.lab import training
from quotopt.lab.cli.main import main
from quotopt.lab.study import FULL, QUICK, STANDARD, n_runs, run_study, write_report
from quotopt.lab.study.protocol import (
    LABELS,
    ROLES,
    FlatPlan,
    Grid,
    RelationalPlan,
    StudyPlan,
    TaskPlan,
    score,
)
from quotopt.lab.study.robustness import basin_share, gauge_spread, seeds_reaching
from quotopt.lab.study.summaries import training_seconds
from quotopt.lab.study.tuning import bracket, extend
from quotopt.lab.training import OPTIMIZERS
from quotopt.lab.training.schedule import lr_factor


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


def test_every_optimiser_of_every_plan_says_what_it_does_to_the_symmetry():
    optims = {o for plan in (QUICK, STANDARD, FULL) for t in plan.tasks for o in t.optims}
    assert optims <= LABELS.keys() and optims <= ROLES.keys()
    assert all(ROLES[o].endswith(".") and len(ROLES[o]) > 40 for o in optims)
    baselines = {"randbias", "gaugefix", "geoopt-stiefel", "grokfast", "qsgd"}
    for task in ("modadd", "chars"):  # the comparisons that place the quotient
        plan = next(t for t in STANDARD.tasks if t.task == task)
        assert baselines - {"grokfast"} <= set(plan.optims)
    assert "grokfast" in next(t for t in STANDARD.tasks if t.task == "modadd").optims


def test_the_standard_plan_brackets_compares_with_muon_and_shifts_the_gauge():
    for t in STANDARD.tasks:
        assert set(t.optims) <= set(OPTIMIZERS) and {"adamw", "muon", "qmuon"} <= set(t.optims)
        assert t.extensions >= 1 and t.gauge_conditions == (1.0, 10.0, 100.0, 1000.0)
        for optim in t.optims:  # three values per tuned axis: a best can be interior
            grid = t.grid(optim)
            assert len(grid.lrs) >= 3 and len(grid.weight_decays) in (1, 3)
    modadd = next(t for t in STANDARD.tasks if t.task == "modadd")
    assert modadd.size == "standard" and modadd.stop_at_target and modadd.criterion == "steps"
    assert {t.task for t in STANDARD.tasks} == {"modadd", "chars", "digits"}


COMMITTED = Path(__file__).resolve().parents[3] / "studies" / "standard" / "study.json"


@pytest.mark.skipif(not COMMITTED.is_file(), reason="the standard study has not been committed")
def test_every_best_setting_of_the_committed_standard_study_is_bracketed():
    results = json.loads(COMMITTED.read_text())
    for task, entry in results["tasks"].items():
        plan = {t.task: t for t in STANDARD.tasks}[task]
        assert set(entry["tuning"]) == set(plan.optims), task  # the baselines included
        for optim, tuned in entry["tuning"].items():
            settings = [(t["lr"], t["weight_decay"]) for t in tuned]
            where = bracket(plan.grid(optim), settings, tuple(entry["best"][optim]))
            assert set(where.values()) <= {"interior", "bound", "fixed"}, (task, optim, where)


def _summary(loss=None, steps=None):
    return dict(final_val_loss=loss, steps_to_target=steps, final=None, diverged=None)


def test_bracketing_extends_an_edge_by_the_grids_ratio_until_the_best_is_interior():
    grid = Grid((1e-3, 3e-3, 1e-2), (0.3, 1.0, 3.0))
    settings = grid.settings()
    losses = {s: 1.0 for s in settings}
    losses[(1e-2, 1.0)] = 0.5  # best at the highest lr, interior decay
    used = {}
    new = extend(grid, settings, [_summary(losses[s]) for s in settings], "loss", 2, used)
    assert new == [(0.0333, 1.0)] and used == {"lr high": 1}
    settings += new
    # the new value loses: the best is bracketed, nothing more is proposed
    summaries = [_summary(losses.get(s, 0.9)) for s in settings]
    assert extend(grid, settings, summaries, "loss", 2, used) == []
    assert bracket(grid, settings, (1e-2, 1.0)) == {"lr": "interior", "wd": "interior"}
    # the new value wins every time: the grid stops after two extensions, on an edge
    settings, used = grid.settings(), {}
    for _ in range(4):
        # a larger lr is always better; the decay is best at 1
        summaries = [_summary(1.0 / s[0] + abs(math.log(s[1]))) for s in settings]
        settings += extend(grid, settings, summaries, "loss", 2, used)
    assert len(settings) == 11 and max(s[0] for s in settings) == 0.111  # 1e-2 × (10/3)²
    assert bracket(grid, settings, (0.111, 1.0)) == {"lr": "edge", "wd": "interior"}
    # a decay of 0 is a bound; a one-value axis is fixed by the plan
    sgd = Grid((0.1, 0.3, 1.0), (0.0, 1e-4))
    assert bracket(sgd, sgd.settings(), (0.3, 0.0)) == {"lr": "interior", "wd": "bound"}
    fixed = Grid((1e-3, 2e-3, 4e-3), (0.1,))
    assert bracket(fixed, fixed.settings(), (2e-3, 0.1)) == {"lr": "interior", "wd": "fixed"}


def test_robustness_measures_come_from_the_runs():
    run = lambda loss, steps=None: dict(summary=_summary(loss, steps))  # noqa: E731
    tuning = [dict(lr=lr, weight_decay=0.1, **run(v)) for lr, v in ((1, 2.0), (2, 2.04), (3, 2.2))]
    assert basin_share(tuning, [(1, 0.1), (2, 0.1), (3, 0.1)], "loss") == (pytest.approx(2 / 3), 3)
    assert basin_share(tuning, [(1, 0.1)], "loss") == (1.0, 1)  # only the starting grid counts
    steps = [
        dict(lr=lr, weight_decay=1, **run(0.1, s)) for lr, s in ((1, 100), (2, 150), (3, None))
    ]
    assert basin_share(steps, [(1, 1), (2, 1), (3, 1)], "steps") == (pytest.approx(2 / 3), 3)
    assert seeds_reaching([run(0.1, 100), run(0.2, None)]) == (1, 2)
    spread = gauge_spread([run(2.0, 100), run(2.002, 100), run(2.001, 120)])
    assert spread["loss"] == pytest.approx(0.002 / 2.001) and spread["steps"] == pytest.approx(0.2)
    failed = gauge_spread([run(2.0), dict(error="NonFiniteStepError: ...")])
    assert failed == {"loss": math.inf}


def test_a_gauge_transformed_start_is_the_same_function_in_another_gauge():
    task = training.build_task("modadd", "tiny")
    x, _ = task.batch("train", None)
    outs, params = [], []
    for kappa in (None, 100.0):
        cfg = training.RunConfig("modadd", size="tiny", steps=1, gauge_condition=kappa)
        model = _initial_model(cfg)
        outs.append(model(x).detach())
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)  # float32, κ = 100
    assert (params[0] - params[1]).abs().max() > 1e-2  # control: the parameters did move


def best_of(entry: dict, optim: str) -> tuple[float, float]:
    return tuple(entry["best"][optim])


class _Stop(Exception):
    pass


def _initial_model(cfg):
    """The model of ``cfg`` as ``train`` starts it (after the gauge transformation)."""
    captured = {}
    original = training.loop.build_optimizer

    def spy(name, model, *args):
        captured["model"] = model
        return original(name, model, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training.loop, "build_optimizer", spy)
        mp.setattr(training.loop, "set_rates", lambda *a: (_ for _ in ()).throw(_Stop()))
        with contextlib.suppress(_Stop):
            training.train(cfg)
    return captured["model"]


def test_a_round_trip_start_is_the_same_gauge_up_to_round_off():
    """g then g⁻¹: the parameters come back to float32 round-off times the conditioning (κ =
    100), so the run is the untransformed one up to that round-off. Control: g alone moves
    them by O(1)."""
    params = {}
    for trip, kappa in ((False, None), (True, 100.0), (False, 100.0)):
        cfg = training.RunConfig("modadd", size="tiny", steps=1, gauge_condition=kappa,
                                 gauge_round_trip=trip)  # fmt: skip
        model = _initial_model(cfg)
        params[trip, kappa] = torch.cat([p.detach().flatten() for p in model.parameters()])
    base = params[False, None]
    back = (params[True, 100.0] - base).abs().max() / base.abs().max()
    moved = (params[False, 100.0] - base).abs().max() / base.abs().max()
    assert 0 < back < 1e-4 and moved > 1e-2
    with pytest.raises(ValueError, match="gauge_round_trip needs a gauge_condition"):
        training.RunConfig("modadd", gauge_round_trip=True).resolved()


def test_runs_saved_before_a_config_field_existed_are_still_reused(tmp_path):
    cfg = training.RunConfig("modadd", size="tiny", steps=2, eval_every=1).resolved()
    training.train(cfg, tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for later in ("variant", "schedule", "gauge_condition", "gauge_round_trip"):
        del summary["config"][later]  # as written before those fields were added
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    assert training.finished_summary(cfg, tmp_path) is not None
    other = dataclasses.replace(cfg, schedule="cosine")  # control: a real difference
    assert training.finished_summary(other, tmp_path) is None


def test_the_cosine_schedule_warms_up_then_decays_to_a_tenth():
    steps = 1000
    factors = [lr_factor("cosine", s, steps) for s in range(steps)]
    assert factors[0] == pytest.approx(1 / 101) and factors[99] == pytest.approx(100 / 101)
    assert factors[100] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[100:], factors[101:]))  # monotone after warm-up
    assert {lr_factor("constant", s, steps) for s in range(steps)} == {1.0}
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        training.RunConfig("modadd", schedule="linear").resolved()
    with pytest.raises(ValueError, match="gauge_condition must be None or a finite number >= 1"):
        training.RunConfig("modadd", gauge_condition=0.5).resolved()


def _micro_plan() -> StudyPlan:
    grid, sgd = Grid((1e-3, 3e-3), (0.1,)), Grid((0.1,), (0.0,))
    # fmt: off
    return StudyPlan(
        name="micro",
        tasks=(
            TaskPlan("modadd", "tiny", 20, ("adamw", "qadam", "sgd"), grid, sgd, "steps",
                     eval_every=10, seeds=(0, 1), stop_at_target=True, extensions=1,
                     gauge_conditions=(1.0, 100.0), gauge_optims=("adamw", "qadam")),
            TaskPlan("sort", "tiny", 10, ("adamw", "qadam"), grid, sgd, "loss", eval_every=5,
                     seeds=(0, 1), schedule="cosine"),
        ),
        relational=RelationalPlan("sort", "tiny", 10, eval_every=5, seeds=(0, 1),
                                  variants=("k4-D2", "k6-D2-gauge"), lr_factors=(2.0,),
                                  dressed=True, equal_param_seeds=(0,)),
        flat=FlatPlan("tiny", 30, lr=3e-3, weight_decays=(0.0, 1e-2)),
    )
    # fmt: on


def test_micro_study_writes_a_page_from_its_runs(tmp_path):
    plan, done, planned = _micro_plan(), [], []
    results = run_study(
        plan, tmp_path / "runs", workers=0, on_done=done.append, on_planned=planned.append
    )
    assert planned and len(done) == n_runs(plan) + sum(planned)  # bracketing added runs
    modadd = results["tasks"]["modadd"]
    assert len(modadd["tuning"]["adamw"]) >= 2 and len(modadd["runs"]["qadam"]) == 2
    best = modadd["best"]["adamw"]
    tuned = {(t["lr"], t["weight_decay"]): t["summary"] for t in modadd["tuning"]["adamw"]}
    assert score(tuned[tuple(best)], "steps") == min(score(s, "steps") for s in tuned.values())
    # the tuning seed's run at the best setting is reused, not trained again
    seed0 = modadd["runs"]["adamw"][0]["summary"]
    assert seed0 == tuned[tuple(best)]
    # the gauge-transformed starts ran at the best setting on the tuning seed
    assert set(modadd["gauge_round_trip"]) == set(modadd["gauge"])  # one round trip each
    assert set(modadd["gauge"]) == {"adamw", "qadam"}  # gauge_optims: SGD has none
    for optim, runs in modadd["gauge"].items():
        assert [r["gauge_condition"] for r in runs] == [1.0, 100.0]
        configs = [r["summary"]["config"] for r in runs]
        assert {(c["lr"], c["weight_decay"], c["seed"]) for c in configs} == {
            (*best_of(modadd, optim), 0)
        }
    assert "gauge" not in results["tasks"]["sort"]
    assert set(modadd["timing"]) == {"adamw", "qadam", "sgd"}  # side by side, every optimiser
    rel = results["relational"]
    assert [s["variant"] for s in rel["sweep"]] == ["k4-D2", "k6-D2-gauge"]
    assert rel["best"]["variant"] in ("k4-D2", "k6-D2-gauge") and len(rel["seeds"]) == 2
    assert {r["summary"]["config"]["variant"] for r in rel["dressed"]} == {
        rel["best"]["variant"] + "-dressed"
    }
    # equal FLOPs: steps scale inversely with the training FLOPs per token
    for s in rel["sweep"]:
        assert s["steps"] == round(10 * rel["reference_flops"] / s["flops"])
    # equal time: the best variant trained for the standard run's side-by-side time, the step
    # budget saved (and reused on resume below, whatever a new timing says)
    eq, timing = rel["equal_time"], rel["timing"]
    ratio = timing["transformer"] / timing[rel["best"]["variant"]]
    assert eq["steps"] == max(1, round(10 * ratio)) and eq["variant"] == rel["best"]["variant"]
    assert [r["summary"]["steps"] for r in eq["runs"]] == [eq["steps"]] * 2
    saved = json.loads((tmp_path / "runs" / "relational" / "equal-time.json").read_text())
    assert saved["steps"] == eq["steps"]
    flat = results["flat"]
    assert [f["objective_weight_decay"] for f in flat] == [0.0, 1e-2]
    assert all(f["orbit_dim"] == 80 and f["compact_orbit_dim"] == 24 for f in flat)

    page = write_report(results, tmp_path / "docs", "quotopt study --micro")
    text = page.read_text()
    # the whole study's training time: every distinct run once, whatever reported it
    trained = {repr(sorted(r["summary"]["config"].items())) for r in done if r.get("summary")}
    count, seconds = training_seconds(results)
    assert count == len(trained) and seconds > 0
    assert f"Its {count} training runs took {seconds / 3600:.1f} CPU-hours in all" in text
    for heading in ("## Optimisers", "## Targets", "## modadd", "## sort", "## Flat", "## Gauge"):
        assert heading in text
    for optim in {o for entry in results["tasks"].values() for o in entry["plan"]["optims"]}:
        assert f"**{LABELS[optim]}** (`{optim}`): {ROLES[optim]}" in text
    assert "QuotientAdam ≤ 0.5× AdamW's steps" in text and "| basin | gauge spread |" in text
    assert "final loss spread over gauges κ ∈ {1, 100} ≤ 1e-3" in text and "round-off floor" in text
    assert "| round trip | floor |" in text
    assert "measured for AdamW, QuotientAdam (the baselines are tuned, bracketed and" in text
    assert (
        "The sweep at equal FLOPs" in text
        and "within 0.05 nats of the standard model at equal training time" in text
        and "trained for the standard run's time" in text
    )
    for name in ("modadd", "sort", "relational", "flat", "dynamics", "modadd-gauge"):
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
    err = capsys.readouterr().err
    assert f"no {tmp_path / 'study.json'} to report from; run the study first" in err
    assert list(tmp_path.iterdir()) == []  # nothing written


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
