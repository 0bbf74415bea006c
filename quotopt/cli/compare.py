"""``quotopt compare``: every optimiser x seed on one task through ``training.train``; writes
``report.md`` (mean ± std over seeds, then every run), ``loss.png``, ``dynamics.png`` and
``metrics.json`` (all runs' summaries and records). Runs live in ``OUT/runs/OPTIM-seedS``."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from .. import training
from .train import add_common_arguments, describe, progress

DEFAULTS = dict(task="sort", optims="adamw,qadam", steps=1000, seeds="0,1,2")


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in training.OPTIMIZERS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown optimiser {', '.join(unknown) or '(none)'}; valid names are "
            f"{', '.join(sorted(training.OPTIMIZERS))}"
        )
    return list(dict.fromkeys(names))


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"seeds must be integers like 0,1,2, got {text!r}"
        ) from None
    if not seeds:
        raise argparse.ArgumentTypeError("give at least one seed")
    return list(dict.fromkeys(seeds))


def add_arguments(parser) -> None:
    d = DEFAULTS
    add_common_arguments(parser, steps=d["steps"], task=d["task"], threads=1, single=False)
    valid = ", ".join(sorted(training.OPTIMIZERS))
    parser.add_argument(
        "--optims",
        type=_names,
        default=_names(d["optims"]),
        help=f"comma-separated optimisers (default: {d['optims']}; from {valid})",
    )
    parser.add_argument(
        "--seeds",
        type=_seeds,
        default=_seeds(d["seeds"]),
        help=f"comma-separated seeds (default: {d['seeds']})",
    )
    parser.add_argument("--resume", action="store_true",
                        help="reuse finished runs, resume interrupted ones")  # fmt: skip


def _run_one(args, cfg, run_dir: Path, bar) -> dict:
    summary = training.finished_summary(cfg, run_dir) if args.resume else None
    if summary is not None:
        bar.update(cfg.steps)
        return summary
    resume = args.resume and (run_dir / "checkpoint.pt").is_file()
    with progress(args, cfg.steps, f"{cfg.optim} seed {cfg.seed}", bar=bar) as hooks:
        return training.train(cfg, run_dir, resume=resume, **hooks)


def run(args) -> int:
    from tqdm import tqdm

    from . import plots
    from .train import config_from_args

    files = ("report.md", "metrics.json", "runs")
    training.claim_out(args.out, resume=args.resume, force=args.force, files=files)
    out = training.prepare_out(args.out)
    base = config_from_args(args, optim=args.optims[0])
    configs = [dataclasses.replace(base, optim=o, seed=s) for o in args.optims for s in args.seeds]
    for cfg in configs:
        cfg.resolved()  # bad names or sizes fail before any run starts
    tic, runs = time.perf_counter(), []
    total = len(configs) * args.steps
    quiet = args.quiet or not sys.stderr.isatty()
    with tqdm(total=total, disable=quiet, dynamic_ncols=True) as bar:
        for cfg in configs:
            run_dir = out / "runs" / f"{cfg.optim}-seed{cfg.seed}"
            summary = _run_one(args, cfg, run_dir, bar)
            runs.append(dict(summary=summary, records=training.read_records(run_dir)))
            if quiet and not args.quiet:
                print(describe(summary), flush=True)
    wall = time.perf_counter() - tic
    title = f"{args.task} ({runs[0]['summary']['config']['size']}), {args.model}"
    training.write_json(out / "metrics.json", dict(wall_time=wall, runs=runs))
    plots.loss_plot(runs, out / "loss.png", title)
    plots.dynamics_plot(runs, out / "dynamics.png", title)
    (out / "report.md").write_text(report(runs, args, wall))
    print(
        f"compared {', '.join(args.optims)} over seeds {args.seeds} in {wall:.0f} s; "
        f"wrote {out / 'report.md'}"
    )
    return 0


def _num(value, fmt="{:.4f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _stat(values, fmt="{:.4f}") -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def report(runs: list[dict], args, wall: float) -> str:
    """The Markdown report: one row per optimiser (mean ± sample std over seeds), then one
    row per run, every seed included."""
    first = runs[0]["summary"]
    metric, target = first["metric"], first["target"]
    goal = f"val {metric} ≥ {target}" if target is not None else "none (lower loss is better)"
    lines = [
        f"# quotopt compare: {args.task}",
        "",
        f"- model: {args.model}, size {first['config']['size']}, {first['n_params']:,} "
        f"parameters; {args.steps} steps; seeds {', '.join(map(str, args.seeds))}",
        f"- target: {goal}; metric reported: validation {metric}",
        f"- machine: {platform.machine()}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, device {first['config']['device']}; "
        f"total wall time {wall:.0f} s",
        "- learning rates and weight decays are each optimiser's registry defaults, not tuned: "
        "compare at each one's best setting (a sweep) before drawing conclusions",
        "- mean ± sample std over seeds; steps to target over the seeds that reached it",
        "",
        f"| optimiser | lr | weight decay | final {metric} | best {metric} | steps to target "
        f"| reached | final val loss | ms / step |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_optim: dict[str, list[dict]] = {}
    for run in runs:
        by_optim.setdefault(run["summary"]["config"]["optim"], []).append(run["summary"])
    for optim, ss in by_optim.items():
        reached = [s["steps_to_target"] for s in ss if s["steps_to_target"] is not None]
        hit = _stat(reached, "{:.0f}") if reached else "not reached"
        lines.append(
            f"| {optim} | {ss[0]['config']['lr']:g} | {ss[0]['config']['weight_decay']:g} | "
            f"{_stat([s['final'] for s in ss])} | {_stat([s['best'] for s in ss])} | "
            f"{hit if target is not None else 'n/a'} | "
            f"{len(reached)}/{len(ss)} | {_stat([s['final_val_loss'] for s in ss])} | "
            f"{_stat([s['ms_per_step'] for s in ss], '{:.1f}')} |"
        )
    lines += [
        "",
        "Every run (steps to target: first evaluation at or above the target; "
        f"evaluations every {first['config']['eval_every']} steps):",
        "",
        f"| optimiser | seed | final {metric} | best {metric} | steps to target | "
        "final val loss | final train loss | ms / step | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in runs:
        s = run["summary"]
        hit = "not reached" if s["steps_to_target"] is None else str(s["steps_to_target"])
        hit = hit if target is not None else "n/a"
        if s.get("diverged"):
            hit = f"diverged at {s['diverged']['step']}"
        lines.append(
            f"| {s['config']['optim']} | {s['config']['seed']} | {_num(s['final'])} | "
            f"{_num(s['best'])} | {hit} | {_num(s['final_val_loss'])} | "
            f"{_num(s['final_train_loss'])} | {s['ms_per_step']:.1f} | {s['wall_time']:.1f} |"
        )
    lines += ["", "![validation loss](loss.png)", "", "![gauge dynamics](dynamics.png)", ""]
    return "\n".join(lines)
