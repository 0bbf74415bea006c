"""``quotopt spectrum``: train a tiny model without weight decay, then count the flat
directions of the Hessian of the full-batch training loss over ALL its parameters, and how
many of them the symmetries explain (the vertical tangents of every bundle group, embedded in
the flattened parameter vector); with weight decay the point is first refined to a critical
point (``critical`` in the JSON). ``val_loss``/``val_accuracy`` are the task's validation
metrics at the counted point.

``--setting NAME`` runs one of ``quotopt.lab.experiments.critical.SETTINGS`` instead — a model that
learns its task (modadd at λ > 0, a teacher regression at λ = 0, the relational model),
refined to ‖∇F‖ at round-off — and reports ``grad_norm``, ``grad_rel``, ``orbit_dim``,
``compact_orbit_dim``, ``flat_total``, ``flat_horizontal``, ``tolerance_rule`` and
``flat_by_tolerance`` of its widest reduction, every reduction under ``counts`` and the
validation metric beside them."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch

from ...dynamics import model_flat_directions
from .. import training
from ..experiments.critical import SETTINGS, count_setting
from .args import fraction, positive_float

MAX_MEMORY_GB = 8.0  # default --max-memory


def add_arguments(parser) -> None:
    from .train import add_common_arguments

    add_common_arguments(parser, steps=2000, size="tiny", task="modadd", threads=1)
    parser.add_argument(
        "--rel-tol",
        type=fraction,
        default=1e-8,
        help="an eigenvalue is flat when |λ| <= rel_tol * max|λ| (default: %(default)g, above "
        "float64 round-off; > 0 and < 1; see flat_by_tolerance in the JSON for other choices)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON result on stdout")
    parser.add_argument(
        "--setting",
        choices=sorted(SETTINGS),
        help="instead of the registry model: train the model of this setting "
        "(quotopt.lab.experiments.critical; --task, --size, --steps, --lr and --weight-decay "
        "do not "
        "apply), refine it to a critical point and count there against each reduction",
    )
    parser.add_argument(
        "--max-memory",
        type=positive_float,
        default=MAX_MEMORY_GB,
        help="refuse an analysis whose matrices would need more than this many GB "
        "(default: %(default)g)",
    )


def memory_estimate(n_params: int, orbit_dim: int, dense_max: int) -> tuple[str, int]:
    """(route, bytes) of the float64 matrices ``model_flat_directions`` forms for a model
    with ``n_params`` parameters and orbit dimension ``orbit_dim``: the dense route
    (n ≤ ``dense_max``) holds the identity, the Hessian and its symmetrised copy (n² each)
    and its eigenvectors; the Lanczos route holds the vertical basis, its Hessian products
    and the columns they are stacked from (n × orbit_dim each). A lower bound: the autograd
    graph of the full-batch loss comes on top."""
    if n_params <= dense_max:
        return "dense", 8 * 4 * n_params**2
    return "lanczos", 8 * 3 * n_params * orbit_dim


def _check_memory(cfg, limit_gb: float) -> None:
    from ...dynamics import model_flat
    from ...groups import symmetries

    task = training.build_task(cfg.task, cfg.size, cfg.seed)
    with torch.device("meta"):  # sizes only: nothing is allocated
        model = training.build_model(task, cfg.model, cfg.size)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    orbit = sum(g["bundle"].group_dim for g in symmetries(model) if "bundle" in g)
    route, need = memory_estimate(n, orbit, model_flat.DENSE_MAX)
    if need > limit_gb * 1e9:
        raise ValueError(
            f"the {route} Hessian analysis of {cfg.task} {cfg.size} ({n:,} parameters, orbit "
            f"dimension {orbit:,}) would need at least {need / 1e9:.1f} GB, above --max-memory "
            f"{limit_gb:g}; choose a smaller --size or raise --max-memory"
        )


def _run_setting(args) -> int:
    """``--setting``: counts at a refined critical point; spectrum.json holds the widest
    reduction's counts at the top level and every reduction's under ``counts``."""
    torch.set_num_threads(args.threads)
    training.claim_out(args.out, resume=False, force=args.force, files=("spectrum.json",))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    result = count_setting(args.setting, seed=args.seed, rel_tol=args.rel_tol)
    widest = max(result["counts"].values(), key=lambda c: c["orbit_dim"])
    keys = (
        "orbit_dim",
        "compact_orbit_dim",
        "expected_flat",
        "flat_total",
        "flat_horizontal",
        "tolerance_rule",
        "flat_by_tolerance",
    )
    result = dict(result, **{k: widest[k] for k in keys})
    result["grad_norm"] = result["refine"]["grad_norm"]
    result["grad_rel"] = result["refine"]["grad_rel"]
    training.write_json(Path(args.out) / "spectrum.json", result)
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        metric = {k: v for k, v in result.items() if k.startswith("val_")}
        shown = ("orbit_dim", "compact_orbit_dim", "flat_total", "flat_horizontal", "grad_rel")
        print(", ".join(f"{k} {result[k]}" for k in shown) + f", {metric}; wrote {args.out}")
    return 0


def run(args) -> int:
    from . import plots
    from .train import config_from_args, progress

    if args.setting is not None:
        return _run_setting(args)

    cfg = config_from_args(  # full batch: the trained loss is the analysed one
        args,
        weight_decay=0.0 if args.weight_decay is None else None,
        batch_size=0 if args.batch_size is None else None,
    )
    cfg = cfg.resolved()
    _check_memory(cfg, args.max_memory)
    files = (*training.RUN_FILES, "spectrum.json", "spectrum.png")
    training.claim_out(args.out, resume=args.resume, force=args.force, files=files)
    out = Path(args.out)
    with progress(args, cfg.steps, f"{cfg.task} {cfg.optim}") as hooks:
        training.train(cfg, out, resume=args.resume, **hooks)
    task = training.build_task(cfg.task, cfg.size, cfg.seed)
    model = training.build_model(task, cfg.model, cfg.size)
    model.load_state_dict(training.load_checkpoint(out / "checkpoint.pt")["model"])
    decay = cfg.weight_decay or 0.0  # refine to a critical point where one exists (λ > 0)
    report = model_flat_directions(task, model, args.rel_tol, decay, refine=decay > 0)
    metrics = task.evaluate(model, "val")  # at the counted (refined, if λ > 0) point
    report.update({f"val_{k}": v for k, v in metrics.items()})
    result = dict(
        task=cfg.task,
        model=cfg.model,
        size=cfg.size,
        optim=cfg.optim,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        steps=cfg.steps,
        seed=cfg.seed,
        **report,
    )
    result = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()
    }
    training.write_json(out / "spectrum.json", result)
    plots.spectrum_plot(result, out / "spectrum.png")
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        keys = ("n_params", "orbit_dim", "flat_total", "flat_horizontal", "tolerance_rule")
        print(", ".join(f"{k} {result.get(k)}" for k in keys) + f"; wrote {out}")
    return 0
