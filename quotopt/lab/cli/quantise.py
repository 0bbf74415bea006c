"""``quotopt quantise``: choose the representative of a pretrained byte-level LLaMA that
quantises best, per method and calibration seed (``quotopt.lab.gauge_study``); writes
``report.md``, ``quantise.png`` and ``results.json``; runs live in ``OUT/runs``."""

from __future__ import annotations

import argparse
import dataclasses
import platform
import time

import torch

from .. import training
from ..finetune.pretrain import portable
from .args import (
    QUICK_PRETRAIN,
    add_output_options,
    add_pretrained_options,
    positive_float,
    positive_int,
    seeds,
)
from .progress import RunBars

QUICK = dict(steps=3, batch_size=2, n_eval=4, seeds=(0,))
SIZES = {"small": {}, "wide": dict(hidden_size=256, layers=6, heads=8, intermediate_size=688)}


def _method_names() -> tuple[str, ...]:
    from ...gauge.methods import METHODS

    return tuple(METHODS)


def _methods(text: str) -> tuple[str, ...]:
    from ...gauge.methods import METHODS

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: unknown method "
            f"{', '.join(map(repr, unknown)) or '(none given)'}; "
            f"valid names are {', '.join(METHODS)}"
        )
    return names


def _bits(text: str) -> str:
    from ...gauge.quantisers import QuantSpec

    try:
        return QuantSpec.parse(text).name
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r}: {err}") from None


def add_arguments(parser) -> None:
    opt = parser.add_argument
    opt(
        "--bits",
        type=_bits,
        default="W4A4KV4",
        help="W<b>[g<group>][A<b>][KV<b>] (default %(default)s)",
    )
    opt("--methods", type=_methods, help=f"methods (default: all, {','.join(_method_names())})")
    opt("--seeds", type=seeds, help="calibration seeds (default 0,1,2; --quick: 0)")
    opt("--steps", type=positive_int, help="search steps (default 100; --quick: 3)")
    opt("--lr", type=positive_float, default=1e-2, help="search rate (default %(default)s)")
    opt("--batch-size", type=positive_int, help="calibration windows per step (default 8)")
    opt("--n-eval", type=positive_int, help="validation windows (default 64)")
    opt(
        "--model",
        choices=sorted(SIZES),
        default="small",
        help="pretrained model: small (4 x 128) or wide (6 x 256) (default %(default)s)",
    )
    add_pretrained_options(parser)
    add_output_options(parser, resume="reuse finished runs, continue a started one")


def _finished(result: dict) -> str:
    return f"perplexity {result['perplexity']:.4f}"


def run(args) -> int:
    from ..finetune import ByteCorpus, PretrainConfig, pretrained
    from ..gauge_study import StudyConfig, figure, report, study

    torch.set_num_threads(args.threads)
    pre = dict(QUICK_PRETRAIN) if args.quick else dict(SIZES[args.model])
    pretrain = PretrainConfig(**pre)
    config = StudyConfig(bits=args.bits, **(QUICK if args.quick else {}))
    chosen = dict(
        methods=args.methods,
        seeds=args.seeds and tuple(args.seeds),
        steps=args.steps,
        batch_size=args.batch_size,
        n_eval=args.n_eval,
    )
    config = dataclasses.replace(config, lr=args.lr, **{k: v for k, v in chosen.items() if v})
    files = ("report.md", "results.json", "runs")
    training.claim_out(args.out, resume=args.resume, force=args.force, files=files)
    out = training.prepare_out(args.out)
    tic = time.perf_counter()
    model, facts = pretrained(pretrain, args.cache)
    data = ByteCorpus.plays(pretrain.seq_len, pretrain.max_bytes)
    progress = RunBars(args, _finished)
    try:
        results = study(out, model, data, config, resume=args.resume, progress=progress)
    finally:
        progress.bar.close()
    wall = time.perf_counter() - tic
    training.write_json(
        out / "results.json",
        dict(
            results, wall_time=wall, pretrained=portable(facts), config=dataclasses.asdict(config)
        ),
    )
    figure(results, out / "quantise.png")
    p = facts["config"]
    lines = [
        f"model: LLaMA-style byte decoder, {p['layers']} layers, width {p['hidden_size']}, "
        f"{p['heads']} heads, context {p['seq_len']}, pretrained on the plays (val loss "
        f"{facts['val_loss']:.4f} nats/byte; cache key {facts['key']})",
        f"quantisation {config.bits}: RTN weights (symmetric, per output channel), activations "
        "per token (symmetric), keys/values per token and head (asymmetric); embedding and "
        "read-out in full precision",
        f"search: {config.steps} steps of {config.batch_size} calibration windows (train split), "
        f"lr {config.lr:g} decayed linearly; seeds {', '.join(map(str, config.seeds))}; "
        f"perplexity on {config.n_eval} validation windows",
        f"torch {torch.__version__}, {args.threads} thread(s), {platform.machine()}; {wall:.0f} s",
    ]
    training.write_text(
        out / "report.md", report(results, lines, {"perplexity and search": "quantise.png"})
    )
    print(
        f"quantised {len(config.methods)} methods x {len(config.seeds)} seeds in {wall:.0f} s; "
        f"wrote {out / 'report.md'}"
    )
    return 0
