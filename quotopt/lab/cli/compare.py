"""``quotopt compare``: every optimiser × seed × start on one task through ``training.train``.

Each optimiser runs at the setting the committed study found best for the task (its learning
rate, weight decay and schedule; the registry's defaults where the study has none), from the
default initialisation and from the same function in ill-conditioned gauges (``--gauges``:
``RunConfig.gauge_condition``). Writes ``report.md`` (one table: quality, steps to target,
spread over the starts and time per step side by side; then every run), ``gauge.png`` (one
panel per optimiser, one curve per start), ``loss.png``, ``dynamics.png`` and ``metrics.json``.
Runs live in ``OUT/runs/OPTIM-seedS[-gaugeK]``; the report is ``compare_report``. Guide:
``docs/guides/compare.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path

from .. import training
from ..study.protocol import LABELS
from .args import available_cpus, optimizer_list, seeds, worker_count
from .compare_report import reference_loss, report, spreads
from .train import add_common_arguments, describe

#: the committed study, whose best settings per task and optimiser the comparison takes
STUDY = Path(__file__).resolve().parents[3] / "studies" / "standard" / "study.json"
DEFAULTS = dict(
    task="chars",
    size="quick",
    optims="adamw,muon,qadam,qmuon",
    steps=400,
    seeds="0",
    gauges="100",
    evaluations=20,
)


def _gauges(text: str) -> list[float]:
    """Condition numbers κ ≥ 1 of the gauge-transformed starts, or ``none``."""
    if text.strip().lower() == "none":
        return []
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or not all(math.isfinite(v) and v >= 1 for v in values):
        raise argparse.ArgumentTypeError(
            f"must be comma-separated condition numbers >= 1 like 10,100, or none; got {text!r}"
        )
    return list(dict.fromkeys(values))


def _settings(text: str) -> dict | None:
    """``defaults`` (None: the registry's), or a study's ``study.json``: its tasks' plans and
    best settings."""
    if text == "defaults":
        return None
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(
            f"no study results at {path} (a source checkout has studies/standard/study.json); "
            "give the path of a study.json, or 'defaults' for the registry's settings"
        )
    try:
        tasks = json.loads(path.read_text())["tasks"]
    except (ValueError, KeyError, TypeError):
        raise argparse.ArgumentTypeError(f"{path} is not a study.json (no 'tasks')") from None
    return dict(path=str(path), tasks=tasks)


def add_arguments(parser) -> None:
    d = DEFAULTS
    resume = "reuse finished runs, resume interrupted ones"
    common = dict(steps=d["steps"], task=d["task"], size=d["size"], threads=1, resume=resume)
    add_common_arguments(parser, single=False, **common)
    evals = d["evaluations"]
    parser._option_string_actions["--eval-every"].help = (  # compare's own default
        f"steps between evaluations (default: steps/{evals}, {evals} points per curve)"
    )
    valid = ", ".join(sorted(training.optimizer_names("full")))
    opt = parser.add_argument
    opt(
        "--optims",
        type=optimizer_list,
        default=optimizer_list(d["optims"]),
        help=f"comma-separated optimisers (default: {d['optims']}; from {valid})",
    )
    opt(
        "--seeds",
        type=seeds,
        default=seeds(d["seeds"]),
        help=f"comma-separated seeds (default: {d['seeds']})",
    )
    opt(
        "--gauges",
        type=_gauges,
        default=_gauges(d["gauges"]),
        help="condition numbers κ of the extra starts: the default initialisation transformed "
        "by a random element of every symmetry group of condition number κ (the same function "
        f"in another gauge); 'none' for the default start alone (default: {d['gauges']})",
    )
    opt(
        "--settings",
        type=_settings,
        default=str(STUDY),
        help="where each optimiser's lr, weight decay and schedule come from: a study.json "
        "(its best setting per task and optimiser; the registry's defaults where it has none) "
        "or 'defaults' (default: the committed study, studies/standard/study.json)",
    )
    opt(
        "--workers",
        type=worker_count,
        default=min(2, available_cpus()),
        help="parallel runs, one torch thread each; 1 runs in this process with --threads "
        "(default: %(default)s)",
    )


def setting(settings: dict | None, task: str, optim: str) -> dict:
    """lr, weight decay, schedule of ``optim`` on ``task`` and where they come from: the
    study's best setting, or the registry's defaults (schedule constant) where it has none."""
    entry = (settings or {}).get("tasks", {}).get(task)
    best = (entry or {}).get("best", {}).get(optim)
    if best is None:
        lr, wd = training.default_hparams(optim, task)
        return dict(lr=lr, weight_decay=wd, schedule=None, source="registry default")
    plan = entry["plan"]
    source = f"study: {task} {plan['size']}, {plan['steps']} steps"
    return dict(lr=best[0], weight_decay=best[1], schedule=plan["schedule"], source=source)


def configs(args) -> list[tuple[training.RunConfig, str]]:
    """(config, run directory name) of every optimiser × seed × start, each at its setting;
    bad names or sizes fail here, before any run starts."""
    from .train import config_from_args

    base = config_from_args(args, optim=args.optims[0])
    if args.eval_every is None:
        base = dataclasses.replace(base, eval_every=max(1, args.steps // DEFAULTS["evaluations"]))
    out = []
    for optim in args.optims:
        s = setting(args.settings, args.task, optim)
        schedule = args.schedule or s["schedule"] or "constant"
        for seed in args.seeds:
            for kappa in [None, *args.gauges]:
                cfg = dataclasses.replace(
                    base,
                    optim=optim,
                    seed=seed,
                    lr=s["lr"],
                    weight_decay=s["weight_decay"],
                    schedule=schedule,
                    gauge_condition=kappa,
                )
                cfg.resolved()
                name = f"{optim}-seed{seed}" + ("" if kappa is None else f"-gauge{kappa:g}")
                out.append((cfg, name))
    return out


def train_run(cfg: training.RunConfig, directory: str, resume: bool) -> dict:
    """``{"summary", "records"}`` of one run: a finished one reused on ``resume``, an
    interrupted one continued, otherwise trained afresh."""
    directory = Path(directory)
    summary = training.finished_summary(cfg, directory) if resume else None
    if summary is None:
        again = resume and (directory / "checkpoint.pt").is_file()
        summary = training.train(cfg, directory, resume=again)
    return dict(summary=summary, records=training.read_records(directory))


def train_in_worker(cfg: training.RunConfig, directory: str, resume: bool) -> dict:
    """``train_run`` in a worker process: Ctrl-C (the checkpoint already saved) is reported
    to the parent, which stops the comparison."""
    try:
        return train_run(cfg, directory, resume)
    except KeyboardInterrupt:
        return dict(interrupted=True)


def run(args) -> int:
    from tqdm import tqdm

    from ..study.runner import Pool
    from . import plots

    files = ("report.md", "metrics.json", "runs")
    jobs = configs(args)  # before anything is created
    training.claim_out(args.out, resume=args.resume, force=args.force, files=files)
    out = training.prepare_out(args.out)
    quiet = args.quiet or not sys.stderr.isatty()
    workers = min(args.workers, len(jobs))
    fn = train_in_worker if workers > 1 else train_run
    tic = time.perf_counter()
    with tqdm(total=len(jobs), disable=quiet, unit="run", dynamic_ncols=True) as bar:

        def done(result):
            bar.update(1)
            if quiet and not args.quiet and "summary" in result:
                print(describe(result["summary"]), flush=True)

        with Pool(workers if workers > 1 else 0, on_done=done) as pool:
            runs = pool.map(
                fn, [(cfg, str(out / "runs" / name), args.resume) for cfg, name in jobs]
            )
    wall = time.perf_counter() - tic
    first = runs[0]["summary"]
    title = f"{args.task} ({first['config']['size']}), {args.model}"
    settings = {o: setting(args.settings, args.task, o) for o in args.optims}
    ref = reference_loss(runs)
    gauge = spreads(runs)
    result = dict(
        wall_time=wall,
        workers=workers,
        settings=settings,
        reference_loss=ref,
        gauge_spread=gauge,
        runs=runs,
    )
    training.write_json(out / "metrics.json", result)
    plots.gauge_plot(runs, out / "gauge.png", _figure_title(title, args), _titles(settings, gauge))
    plots.loss_plot(runs, out / "loss.png", title)
    plots.dynamics_plot(runs, out / "dynamics.png", title)
    training.write_text(out / "report.md", report(runs, args, wall, workers, settings))
    print(
        f"compared {', '.join(args.optims)} over seeds {args.seeds} and "
        f"{1 + len(args.gauges)} starts in {wall:.0f} s; wrote {out / 'report.md'}"
    )
    return 0


def _figure_title(title: str, args) -> str:
    kappas = " and ".join(f"κ = {k:g}" for k in args.gauges)
    starts = f"; dashed: the same function in a gauge of {kappas}" if kappas else ""
    return f"{title}, {args.steps} steps. Solid: the default initialisation{starts}"


def _titles(settings: dict, gauge: dict) -> dict[str, str]:
    """Panel titles: the optimiser's name, its setting and its spread over the starts."""
    out = {}
    for optim, s in settings.items():
        spread = f"; spread {max(gauge[optim]):.1e}" if gauge.get(optim) else ""
        out[optim] = f"{LABELS.get(optim, optim)}\nlr {s['lr']:g}, wd {s['weight_decay']:g}{spread}"
    return out
