"""What the study runs: tasks, sizes, step budgets, optimisers and their (lr, weight decay)
grids, for the ``quick``, ``standard`` and ``full`` plans.

Every optimiser is tuned on the same budget: the whole (lr, wd) grid of its family on the
tuning seed, the best setting by the task's criterion (``score``), then every other seed at
that setting. Decay numbers mean different things in different parametrisations (decoupled
decay on balanced factors shrinks the head product relatively harder), so decay is tuned like
the learning rate and each optimiser is reported at its own best.

*Bracketing* (``TaskPlan.extensions`` > 0): while an optimiser's best setting sits on the edge
of an axis of its grid, the grid grows past that edge by the axis's own ratio (one more value
at the best value of the other axis), up to ``extensions`` times per edge; a decay of 0 is a
bound, not an edge. ``tuning.bracket`` says, for the final best, whether each axis is
``interior``, at a ``bound``, or still on an ``edge`` after the allowed extensions.

*Gauge robustness* (``TaskPlan.gauge_conditions``): at its best setting on the tuning seed,
every optimiser also starts from gauge-transformed copies of the same initial function (a
random element of every symmetry group, of condition number κ for each κ listed; the same
seed, batches and function otherwise); ``robustness.gauge_spread`` measures how far the
outcomes spread.
"""

from __future__ import annotations

import dataclasses
import math

from ..training.optimizers import OPTIMIZERS, optimizer_names

#: the study's optimisers are the registry's full-model entries
#: (``quotopt.lab.training.OPTIMIZERS``):
#: Adam-like ones (decoupled decay or decay on invariants) share one grid, SGD-like ones (coupled
#: L2 decay) another
_ENTRIES = [OPTIMIZERS[name] for name in optimizer_names("full")]
ADAM_LIKE = tuple(e.name for e in _ENTRIES if e.family == "adam")
SGD_LIKE = tuple(e.name for e in _ENTRIES if e.family == "sgd")
LABELS = {e.name: e.label for e in _ENTRIES}
#: what each optimiser does to the symmetry, one sentence each (the results page lists them)
ROLES = {e.name: e.role for e in _ENTRIES}
#: the Adam-like quotient optimisers, whose targets the page checks against AdamW and Muon
QUOTIENT = tuple(e.name for e in _ENTRIES if e.quotient and e.family == "adam")


@dataclasses.dataclass(frozen=True)
class Grid:
    lrs: tuple[float, ...]
    weight_decays: tuple[float, ...]

    def settings(self) -> list[tuple[float, float]]:
        return [(lr, wd) for lr in self.lrs for wd in self.weight_decays]


@dataclasses.dataclass(frozen=True)
class TaskPlan:
    """One task: optimisers, grids by family, seeds; ``criterion`` picks the best setting:
    "steps" (fewest steps to the task's target, then validation loss), "loss" (final validation
    loss) or "accuracy" (final validation accuracy, then loss)."""

    task: str
    size: str
    steps: int
    optims: tuple[str, ...]
    adam_grid: Grid
    sgd_grid: Grid
    criterion: str
    eval_every: int
    seeds: tuple[int, ...] = (0, 1, 2)
    tune_seed: int = 0
    stop_at_target: bool = False
    schedule: str = "constant"  # learning-rate schedule of every run (training.schedule)
    extensions: int = 0  # bracketing: how many times the grid may grow past each edge
    gauge_conditions: tuple[float, ...] = ()  # gauge-transformed starts at the best setting
    gauge_optims: tuple[str, ...] | None = None  # who gets those starts (None: every optimiser)

    def grid(self, optim: str) -> Grid:
        return self.sgd_grid if OPTIMIZERS[optim].family == "sgd" else self.adam_grid

    def gauge_starts(self, optim: str) -> tuple[float, ...]:
        """The condition numbers of ``optim``'s gauge-transformed starts (none if it is not
        one of ``gauge_optims``)."""
        chosen = self.gauge_optims is None or optim in self.gauge_optims
        return self.gauge_conditions if chosen else ()


@dataclasses.dataclass(frozen=True)
class RelationalPlan:
    """Transformer vs RelationalTransformer on ``task``, every run with AdamW at the standard
    model's tuned setting (``lr_factors`` then tune the best variant's rate around it).

    * *Equal parameters*: the relational channel count chosen by ``training.build_model`` so
      that the parameter counts match, on ``equal_param_seeds`` (None: ``seeds``).
    * *Equal compute*: each of ``variants`` (``training.parse_variant`` names) trains for the
      standard run's training FLOPs (``steps`` × the standard model's training FLOPs per token
      ÷ its own), on the tuning seed; the best by final validation loss is retuned over
      ``lr_factors`` × the rate, then rerun on every seed, beside its dressed twin when
      ``dressed``. The page also reads every run's loss at the standard run's training time.
    """

    task: str
    size: str
    steps: int
    eval_every: int
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = ()
    lr_factors: tuple[float, ...] = ()
    dressed: bool = False
    equal_param_seeds: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class FlatPlan:
    """Flat directions. ``settings``: ``quotopt.lab.experiments.critical.SETTINGS`` names, each a
    model
    that learns its task, counted at a refined critical point (``study.flat.critical_job``).
    ``size, steps, lr, weight_decays``: the earlier experiment (modadd at ``size`` after
    full-batch Adam with coupled L2 decay, unrefined: ``study.flat.flat_job``), one per λ."""

    size: str
    steps: int
    lr: float
    weight_decays: tuple[float, ...]
    seed: int = 0
    settings: tuple[str, ...] = ()


#: every setting of ``quotopt.lab.experiments.critical`` (models that learn, refined before
#: counting)
CRITICAL = (
    "modadd",
    "regression",
    "regression-teacher",
    "regression-teacher-decay",
    "regression-teacher-decay-wide",
    "regression-teacher-decay-large",
    "regression-teacher-decay-xl",
    "relational",
    "relational-teacher",
    "relational-teacher-decay",
)


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    name: str
    tasks: tuple[TaskPlan, ...]
    relational: RelationalPlan
    flat: FlatPlan
    dynamics_task: str = "modadd"


def score(summary: dict | None, criterion: str) -> tuple[float, ...]:
    """Sort key of a run (smaller is better); a missing, diverged or non-finite run sorts last."""
    if summary is None or summary.get("diverged"):
        return (math.inf, math.inf)
    loss = summary.get("final_val_loss")
    loss = math.inf if loss is None or not math.isfinite(loss) else loss
    if criterion == "steps":
        hit = summary.get("steps_to_target")
        return (math.inf if hit is None else hit, loss)
    if criterion == "accuracy":
        final = summary.get("final")
        return (math.inf if final is None else -final, loss)
    return (loss,)


_EVERYONE = ("adamw", "sgd", "qadam", "qadam-inv", "qsgd", "geoopt-stiefel", "randbias", "gaugefix")
_ADAM = Grid((3e-3, 1e-2), (0.01, 0.1))
_SORT_ADAM = Grid((1e-3, 3e-3), (0.01, 0.1))
_SGD = Grid((0.1, 0.3), (0.0, 1e-4))
_SORT_SGD = Grid((0.03, 0.1), (0.0, 1e-4))
_MODADD_ADAM = Grid((3e-3, 1e-2), (1.0, 3.0, 10.0))
_MODADD_SGD = Grid((0.1, 0.3), (1e-3, 1e-2))


QUICK = StudyPlan(
    name="quick",
    tasks=(
        TaskPlan(
            "modadd",
            "quick",
            2000,
            _EVERYONE + ("grokfast",),
            _MODADD_ADAM,
            _MODADD_SGD,
            "steps",
            eval_every=50,
            stop_at_target=True,
        ),
        TaskPlan(
            "sort",
            "quick",
            1000,
            _EVERYONE,
            _SORT_ADAM,
            _SORT_SGD,
            "steps",
            eval_every=50,
            stop_at_target=True,
        ),
        TaskPlan("chars", "quick", 1000, _EVERYONE, _ADAM, _SGD, "loss", eval_every=100),
        TaskPlan("digits", "quick", 1000, _EVERYONE, _ADAM, _SGD, "accuracy", eval_every=100),
    ),
    relational=RelationalPlan("chars", "quick", 1000, eval_every=50),
    flat=FlatPlan("tiny", 6000, lr=3e-3, weight_decays=(0.0, 1e-3, 1e-2)),
)

FULL = StudyPlan(
    name="full",
    tasks=(
        TaskPlan(
            "modadd",
            "nanda",
            10_000,
            _EVERYONE + ("grokfast",),
            Grid((3e-4, 1e-3, 3e-3), (0.3, 1.0, 2.0, 3.0)),
            Grid((0.03, 0.1, 0.3), (1e-4, 1e-3)),
            "steps",
            eval_every=50,
            stop_at_target=True,
        ),
        TaskPlan(
            "sort",
            "small",
            2000,
            _EVERYONE,
            Grid((3e-4, 1e-3, 3e-3), (0.01, 0.1, 1.0)),
            Grid((0.03, 0.1, 0.3), (0.0, 1e-4)),
            "steps",
            eval_every=50,
            stop_at_target=True,
        ),
        TaskPlan(
            "chars",
            "small",
            2000,
            _EVERYONE,
            Grid((1e-3, 2e-3, 4e-3), (0.01, 0.1, 0.3)),
            Grid((0.03, 0.1, 0.3), (0.0, 1e-4)),
            "loss",
            eval_every=100,
        ),
        TaskPlan(
            "digits",
            "small",
            2000,
            _EVERYONE,
            Grid((3e-4, 1e-3, 3e-3), (0.01, 0.1, 1.0)),
            Grid((0.03, 0.1, 0.3), (0.0, 1e-4)),
            "accuracy",
            eval_every=100,
        ),
    ),
    relational=RelationalPlan("chars", "small", 2000, eval_every=100),
    flat=FlatPlan("tiny", 20_000, lr=3e-3, weight_decays=(0.0, 1e-3, 1e-2), settings=CRITICAL),
)


# ``standard``: sizes that mean something, in about two hours on 2 cores. modadd at p = 59 with
# Nanda et al.'s one-layer ReLU model at half width (d = 64, 4 heads of 16, MLP 256; full batch,
# 30 % of pairs for training); chars at nanoGPT's CPU configuration (d = 128, 4 layers, context
# 64, batch 12) with its cosine schedule, decay fixed at nanoGPT's 0.1 (tuning it moved the loss
# by ~0.01 nats in the quick plan); digits at 64 wide. Sort is left out: every optimiser solves
# it, so it does not rank them. The optimisers: the two baselines and the two quotient
# optimisers that won somewhere in the quick plan (QuotientAdam with the invariant metric lost
# on chars and diverged on modadd there; the quick and full plans keep it).
_STANDARD = ("adamw", "muon", "qadam", "qmuon")
# the comparisons that place the quotient: symmetry *breaking* (random biases), gauge *fixing*
# (W_Q = I), a constraint instead of a quotient (geoopt's Stiefel heads), the reduction without
# adaptivity (QuotientSGD), and, where grokking is the question, Grokfast; on modadd and chars
# (tuned, bracketed and seeded like the others; the gauge-transformed starts, five runs per
# optimiser and task, are kept for the four optimisers the page compares)
_STANDARD_BASELINES = ("qsgd", "geoopt-stiefel", "randbias", "gaugefix")
# relational variants within ±20 % of the standard chars model's training FLOPs per token: the
# gauge dimension D, channels k, head rank r, MLP width m and the positions vary one at a time
# around k64-D4-r16-m128 (the equal-parameter model, k = 112, costs 4.7× the FLOPs)
_EQUAL_FLOPS = (
    "k64-D4-r16-m128",
    "k96-D2-r24-m192",
    "k48-D8-r12-m96",
    "k48-D4-r12-m192",
    "k64-D4-r8-m128",
    "k64-D4-r16-m128-gauge",
)
_KAPPAS = (1.0, 10.0, 100.0, 1000.0)

STANDARD = StudyPlan(
    name="standard",
    tasks=(
        TaskPlan(
            "modadd",
            "standard",
            2500,
            _STANDARD + _STANDARD_BASELINES + ("grokfast",),
            Grid((1e-3, 3e-3, 1e-2), (0.3, 1.0, 3.0)),
            Grid((0.03, 0.1, 0.3), (1e-3, 1e-2, 0.1)),
            "steps",
            eval_every=50,
            stop_at_target=True,
            extensions=2,
            gauge_conditions=_KAPPAS,
            gauge_optims=_STANDARD,
        ),
        TaskPlan(
            "chars",
            "small",
            2000,
            _STANDARD + _STANDARD_BASELINES,
            Grid((1e-3, 2e-3, 4e-3), (0.1,)),
            Grid((0.03, 0.1, 0.3), (0.0,)),
            "loss",
            eval_every=100,
            schedule="cosine",
            extensions=2,
            gauge_conditions=_KAPPAS,
            gauge_optims=_STANDARD,
        ),
        TaskPlan(
            "digits",
            "small",
            1000,
            _STANDARD,
            Grid((1e-3, 3e-3, 1e-2), (0.01, 0.1, 1.0)),
            _SGD,
            "accuracy",
            eval_every=100,
            extensions=2,
            gauge_conditions=_KAPPAS,
            gauge_optims=_STANDARD,
        ),
    ),
    relational=RelationalPlan(
        "chars",
        "small",
        2000,
        eval_every=100,
        variants=_EQUAL_FLOPS,
        lr_factors=(0.5, 2.0),
        dressed=True,
        equal_param_seeds=(0,),
    ),
    flat=FlatPlan("tiny", 6000, lr=3e-3, weight_decays=(), settings=CRITICAL),
)

PLANS = {"quick": QUICK, "standard": STANDARD, "full": FULL}


def n_runs(plan: StudyPlan) -> int:
    """Jobs in ``plan`` before bracketing adds any: tuning grid + every seed at the best
    setting (the tuning seed's run is reused there, not trained again, but counts as a job) +
    gauge-transformed starts + one timing job per task; the relational phase (standard and
    equal-parameter runs; the sweep, the retuned rates, every seed of the best variant and its
    dressed twin, their timing job, and the best variant's seeds at equal time); flat."""
    total = len(plan.tasks)
    for t in plan.tasks:
        for optim in t.optims:
            kappas = t.gauge_starts(optim)
            total += len(t.grid(optim).settings()) + len(t.seeds) + len(kappas)
            total += bool(kappas)  # the round trip at the largest κ
    rp = plan.relational
    total += len(rp.seeds) + len(rp.seeds if rp.equal_param_seeds is None else rp.equal_param_seeds)
    if rp.variants:
        total += len(rp.variants) + len(rp.lr_factors) + 1 + len(rp.seeds) * (2 + rp.dressed)
    return total + len(plan.flat.weight_decays) + len(plan.flat.settings)
