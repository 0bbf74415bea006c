"""``quotopt finetune``: LoRA fine-tuning of a small pretrained byte decoder on the standard
library's source (``--task stdlib``) or English reference prose (``--task prose``), per rank
and optimiser, tuned then seeded (``quotopt.lab.finetune``); writes ``report.md``, ``curves.png``,
``lr.png`` and ``results.json``; runs live in ``OUT/runs``."""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time

import torch

from .. import training
from ..finetune.pretrain import portable
from ..training.optimizers import optimizer_names
from .args import (
    QUICK_PRETRAIN,
    add_output_options,
    add_pretrained_options,
    nonnegative_int,
    optimizer_list,
    positive_floats,
    positive_int,
    seeds,
)
from .progress import RunBars

#: most grid growths per side (``--max-extend``): each multiplies the edge by the grid's ratio
MAX_EXTEND = 10

QUICK = dict(steps=10, seq_len=32, eval_every=5, n_eval=8, max_bytes=100_000)
#: the study's sizes: fine-tuning and pretraining steps
STEPS, PRETRAIN_STEPS = 400, 1500


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        ranks = []
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"ranks must be positive integers, got {text!r}")
    return list(dict.fromkeys(ranks))


def _optims(text: str) -> list[str]:
    return optimizer_list(text, "lora")


def _extensions(text: str) -> int:
    value = nonnegative_int(text)
    if value > MAX_EXTEND:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {MAX_EXTEND}, got {text!r}")
    return value


def add_arguments(parser) -> None:
    opt = parser.add_argument
    names = ", ".join(optimizer_names("lora"))
    opt("--ranks", type=_ranks, help="LoRA ranks (default 4,16,64; --quick: 2,4)")
    opt(
        "--optims",
        type=_optims,
        default="adamw,loraplus,qadam-inv,scaledgd",
        help=f"optimisers (default: %(default)s; from {names})",
    )
    opt(
        "--task",
        choices=("stdlib", "prose"),
        default="stdlib",
        help="fine-tuning text: the standard library's source or the reference's English "
        "prose (default %(default)s)",
    )
    opt("--seeds", type=seeds, help="seeds; the first tunes (default 0,1,2; --quick: 0,1)")
    opt(
        "--lrs",
        type=positive_floats,
        help="learning-rate grid, grown past a best edge (default 1e-3,3e-3,1e-2; --quick: "
        "1e-3,1e-2)",
    )
    opt(
        "--ratios",
        type=positive_floats,
        default="4,16,64",
        help="LoRA+ ratio grid (default %(default)s)",
    )
    opt(
        "--dampings",
        type=positive_floats,
        default="1e-3,1e-2,1e-1",
        help="damping grid of qadam-inv / qsgd-inv (default %(default)s; scaledgd uses the "
        "middle value)",
    )
    opt("--steps", type=positive_int, help=f"fine-tuning steps (default {STEPS}; --quick: 10)")
    opt(
        "--pretrain-steps",
        type=positive_int,
        help=f"pretraining steps (default {PRETRAIN_STEPS}; --quick: 20)",
    )
    opt(
        "--max-extend",
        type=_extensions,
        default=3,
        help=f"grid growths per side, 0 to {MAX_EXTEND} (default 3)",
    )
    add_pretrained_options(parser)
    add_output_options(parser, resume="reuse finished runs")


def _finished(summary: dict) -> str:
    loss = summary["final_val_loss"]
    return "diverged" if loss is None else f"val {loss:.4f}"


def run(args) -> int:
    from .. import finetune as ft

    torch.set_num_threads(args.threads)
    quick = args.quick
    ranks = args.ranks or ([2, 4] if quick else [4, 16, 64])
    seeds = args.seeds or ([0, 1] if quick else [0, 1, 2])
    lrs = args.lrs or ([1e-3, 1e-2] if quick else [1e-3, 3e-3, 1e-2])
    pre = dict(QUICK_PRETRAIN) if quick else dict(steps=PRETRAIN_STEPS)
    if args.pretrain_steps:
        pre["steps"] = args.pretrain_steps
    pretrain = ft.PretrainConfig(**pre)
    width = pretrain.hidden_size  # q/k/v/o_proj are width × width: a rank fits up to width
    if max(ranks) > width:
        raise ValueError(
            f"--ranks: LoRA rank {max(ranks)} exceeds the adapted projections' size {width} "
            f"(q/k/v/o_proj are {width}×{width}, so B A has rank at most {width}); give ranks "
            f"≤ {width}"
        )
    files = ("report.md", "results.json", "runs")
    training.claim_out(args.out, resume=args.resume, force=args.force, files=files)
    out = training.prepare_out(args.out)
    template = ft.FinetuneConfig(
        **(QUICK if quick else dict(steps=STEPS)),
        task=args.task,
        pretrain=dataclasses.asdict(pretrain),
    )
    if args.steps:
        template = dataclasses.replace(template, steps=args.steps)
    dampings = args.dampings
    template = dataclasses.replace(template, damping=dampings[len(dampings) // 2])
    tic = time.perf_counter()
    base, facts = ft.pretrained(pretrain, args.cache)
    data = ft.ByteCorpus.task(args.task, template.seq_len, template.max_bytes)
    progress = RunBars(args, _finished)
    try:
        results = ft.study(
            out,
            base,
            data,
            template,
            ranks=ranks,
            optims=args.optims,
            lrs=lrs,
            seeds=seeds,
            seconds=dict(ratio=args.ratios, damping=dampings),
            resume=args.resume,
            progress=progress,
            max_extend=args.max_extend,
        )
    finally:
        progress.bar.close()
    wall = time.perf_counter() - tic
    training.write_json(
        out / "results.json",
        dict(
            wall_time=wall,
            pretrained=portable(facts),
            results={str(k): v for k, v in results.items()},
        ),
    )
    ft.figures(results, out / "curves.png", out / "lr.png")
    meta = dict(
        title="quotopt finetune: LoRA on the quotient",
        lines=_describe(args, facts, data, template, ranks, seeds, lrs, wall, results),
    )
    images = {"validation loss at the best settings": "curves.png", "lr sweeps": "lr.png"}
    training.write_text(out / "report.md", ft.report(results, meta, images))
    print(
        f"fine-tuned {len(ranks)} ranks x {len(args.optims)} optimisers in {wall:.0f} s; "
        f"wrote {out / 'report.md'}"
    )
    return 0


def _describe(args, facts, data, template, ranks, seeds, lrs, wall, results) -> list[str]:
    from ..finetune import STDLIB_MODULES, TARGETS
    from ..finetune.data import TASKS

    p, c = facts["config"], template
    summaries = {
        json.dumps(s["config"], sort_keys=True): s
        for entries in results.values()
        for e in entries.values()
        for s in e["tuning"] + [r["summary"] for r in e["runs"]]
    }
    summaries = list(summaries.values())
    corpus = TASKS[args.task]()
    text = (
        f"{len(STDLIB_MODULES)} standard-library modules of Python"
        if args.task == "stdlib"
        else "the reference topics (pydoc_data.topics) of Python"
    )
    unit = "files" if args.task == "stdlib" else "topics"
    return [
        f"pretrained: LLaMA-style byte decoder, {p['layers']} layers, width {p['hidden_size']}, "
        f"{p['heads']} heads, context {p['seq_len']}; AdamW {p['steps']} steps of "
        f"{p['batch_size']}×{p['seq_len']} bytes of the plays, lr {p['lr']:g}; val loss "
        f"{facts['val_loss']:.4f} nats/byte; cache key {facts['key']}"
        + (f" (trained in {facts['seconds']:.0f} s)" if facts.get("seconds") else ""),
        f"fine-tuning data ({args.task}): {text} {platform.python_version()}, "
        f"{len(corpus['train_files'])} train {unit} ({data.sizes['train']:,} bytes used), "
        f"{len(corpus['val_files'])} validation {unit} ({data.sizes['val']:,} bytes used: "
        f"{', '.join(corpus['val_files'])})",
        f"LoRA on {', '.join(TARGETS)}, α = {c.alpha:g} at every rank, dropout 0, B = 0; "
        f"everything else frozen; ranks {', '.join(map(str, ranks))}",
        f"{c.steps} steps of {c.batch_size}×{c.seq_len} bytes, constant lr, no weight decay; "
        f"validation every {c.eval_every} steps on {c.n_eval} windows",
        f"tuning on seed {seeds[0]}: lr grid {', '.join(f'{x:g}' for x in lrs)} grown past a "
        f"best edge (up to {args.max_extend}×), then LoRA+ ratio "
        f"{', '.join(f'{x:g}' for x in args.ratios)} / damping "
        f"{', '.join(f'{x:g}' for x in args.dampings)} at the best lr, grown past a best "
        f"edge too; seeds "
        f"{', '.join(map(str, seeds))} at the best",
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}; "
        f"{len(summaries)} runs, {sum(s['wall_time'] for s in summaries):.0f} s of training "
        f"(this invocation {wall:.0f} s)",
    ]
