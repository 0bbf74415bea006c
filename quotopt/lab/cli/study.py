"""``quotopt study``: the protocol of the benchmark study (every optimiser tuned on every task,
seeds at the best settings, relational vs standard, flat directions) and ``docs/results.md``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .args import directory, worker_count


def add_arguments(parser) -> None:
    from ..study.runner import default_workers

    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        dest="plan",
        action="store_const",
        const="quick",
        help="small sizes and grids, under 20 minutes on 2 cores (default)",
    )
    mode.add_argument(
        "--standard",
        dest="plan",
        action="store_const",
        const="standard",
        help="sizes that mean something, about two hours on 2 cores",
    )
    mode.add_argument(
        "--full",
        dest="plan",
        action="store_const",
        const="full",
        help="paper sizes, larger grids (many CPU hours; see docs)",
    )
    parser.set_defaults(plan="quick")
    parser.add_argument(
        "--out", type=directory, default="runs/study", help="run directory (default: %(default)s)"
    )
    parser.add_argument(
        "--docs",
        type=directory,
        default="docs",
        help="where results.md and img/results/ go (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=worker_count,
        default=default_workers(),
        help="parallel runs, one torch thread each, at most the CPU count (default: the CPU "
        "count, %(default)s here)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="reuse finished runs in OUT, resume interrupted ones"
    )
    parser.add_argument("--force", action="store_true", help="replace a previous study in OUT")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the page from OUT/study.json without training",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def _grow(bar, n: int) -> None:
    """Bracketing added ``n`` runs: the bar's total grows by as many."""
    bar.total += n
    bar.refresh()


def run(args) -> int:
    from tqdm import tqdm

    from ..study import PLANS, n_runs, run_study, write_report
    from ..training import claim_out, write_json

    plan = PLANS[args.plan]
    saved = Path(args.out) / "study.json"
    if args.report_only:
        if not saved.is_file():
            raise ValueError(f"no {saved} to report from; run the study first")
        results = json.loads(saved.read_text())
        page = write_report(results, args.docs, results["command"])
        print(f"wrote {page} from {saved}")
        return 0
    files = ("study.json", "runs", "flat", "relational")
    claim_out(args.out, resume=args.resume, force=args.force, files=files)
    with tqdm(
        total=n_runs(plan),
        desc=f"study ({plan.name})",
        unit="run",
        disable=args.quiet,
        file=sys.stderr,
    ) as bar:
        results = run_study(
            plan,
            args.out,
            workers=args.workers,
            resume=args.resume,
            on_done=lambda _: bar.update(1),
            on_planned=lambda n: _grow(bar, n),
        )
    results["command"] = f"quotopt study --{plan.name} --workers {args.workers}"
    write_json(saved, results)
    page = write_report(results, args.docs, results["command"])
    print(f"wrote {page} and {Path(args.out) / 'study.json'} in {results['wall_time']:.0f} s")
    return 0
