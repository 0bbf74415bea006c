"""``quotopt spectrum``: train a tiny model without weight decay, then count the flat
directions of the Hessian of the full-batch training loss over ALL its parameters, and how
many of them the symmetries explain (the vertical tangents of every bundle group, embedded in
the flattened parameter vector)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from .. import training
from ..dynamics import model_flat_directions


def add_arguments(parser) -> None:
    from .train import add_common_arguments

    add_common_arguments(parser, steps=2000, size="tiny", task="modadd", threads=1)
    parser.add_argument(
        "--rel-tol",
        type=float,
        default=1e-8,
        help="an eigenvalue is flat when |λ| <= rel_tol * max|λ| (default: %(default)g, above "
        "float64 round-off; see flat_by_tolerance in the JSON for other choices)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON result on stdout")


def run(args) -> int:
    from . import plots
    from .train import config_from_args, progress

    cfg = config_from_args(  # full batch: the trained loss is the analysed one
        args,
        weight_decay=0.0 if args.weight_decay is None else None,
        batch_size=0 if args.batch_size is None else None,
    )
    out = Path(args.out)
    with progress(args, cfg.steps, f"{cfg.task} {cfg.optim}") as hooks:
        training.train(cfg, out, resume=args.resume, **hooks)
    cfg = cfg.resolved()
    task = training.build_task(cfg.task, cfg.size, cfg.seed)
    model = training.build_model(task, cfg.model, cfg.size)
    model.load_state_dict(training.load_checkpoint(out / "checkpoint.pt")["model"])
    report = model_flat_directions(task, model, args.rel_tol)
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
