"""Train-step cost of the quotient optimisers against AdamW on ``quotopt.models.Transformer``.

What is timed (issue: optimisers). One training step — ``zero_grad``, forward, cross-entropy,
backward, ``step()`` — on a decoder (default: 4 layers, d = 256, 4 heads of 64, context 128,
batch 8, vocabulary 256; ``--quick``: 2 layers, d = 128, context 64) with these optimisers,
each on its own copy of the same initial model, fed the same batches:

* ``adamw``: ``torch.optim.AdamW(model.parameters())`` (torch's default implementation), the
  reference;
* ``qadam``: ``QuotientAdam(quotopt.symmetries(model))`` — HeadQK + HeadOV per layer (Euclidean
  metric), the rest plain AdamW; ``qadam invariant``: the same with ``metric="invariant"``;
  ``qadam dress every step``: ``dress_every=1`` (the default re-dresses every 100 steps, so the
  median step of the other rows is a step without dressing);
* ``qsgd``: ``QuotientSGD(quotopt.symmetries(model), momentum=0.9)``;
* ``muon``: the study's Muon baseline (``quotopt.baselines.muon_adamw``: ``torch.optim.Muon``
  on the hidden matrices, AdamW on the rest); ``qmuon``: the study's QuotientMuon
  (``quotopt.baselines.quotient_muon_adamw``: QuotientMuon with whole-projection scope on the
  head groups, re-dressed every step, Muon on the MLP, AdamW on the rest). Below the table,
  QuotientMuon's ratio to Muon, with its floor;
* ``geoopt stiefel``: geoopt's ``RiemannianAdam`` with every layer's ``wq``, ``wk``, ``wv``
  replaced by one ``geoopt.ManifoldParameter`` of shape (H, d, r) on ``geoopt.Stiefel()`` (the
  canonical metric, geoopt's default: its retraction solves a d × d system per head) — batched
  over heads, projected onto the manifold first; ``wo`` (H, r, d) has fewer rows than columns, so
  it stays Euclidean (geoopt's Stiefel needs shape[-1] <= shape[-2]; transposing it would change
  the model's code), as do embeddings, MLP and read-out. ``geoopt stiefel (euclidean)`` uses
  ``geoopt.Stiefel(canonical=False)`` (projection + QR retraction) instead.

All use lr 1e-3 (0.1 for SGD) and weight decay 0.01; the numbers are not tuned, only timed.
Candidates run once per round in a fixed order (ABAB...) after two warm-up rounds; the train-step
ratio is the median over rounds of (train step / AdamW's train step of the same round), the
step-only ratio the same for ``step()`` alone (see ``benchmarks._timing``). Threads: torch's
default unless ``--threads`` is given; the header prints the count.

``--profile`` adds the torch profiler's top operators of QuotientAdam's step (both metrics).
``compare_optimisers`` is reused by ``bench_models --optim``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import quotopt
from benchmarks._timing import (
    add_common_args,
    alternate,
    clock,
    format_table,
    median,
    paired_ratio,
    print_header,
    setup_threads,
)
from quotopt import baselines
from quotopt.baselines import stiefel_heads
from quotopt.models import Transformer

MODULE = "benchmarks.bench_optimizer"
LR, WEIGHT_DECAY = 1e-3, 0.01

SIZES = {
    "default": dict(vocab=256, d_model=256, n_layers=4, n_heads=4, context=128, batch=8),
    "quick": dict(vocab=256, d_model=128, n_layers=2, n_heads=4, context=64, batch=8),
    "tiny": dict(vocab=32, d_model=16, n_layers=1, n_heads=2, context=8, batch=2),
}
#: the GPT-2-small head shape (12 layers × 12 heads of 64, d = 768), timed step-only: its
#: gradients come from one small batch, the comparison is of the optimisers' own work
GPT2_SMALL = dict(vocab=256, d_model=768, n_layers=12, n_heads=12, context=64, batch=1)


def geometry_flops(cfg: dict, metric: str = "euclidean") -> float:
    """The FLOP floor of one quotient step's geometry (docs/benchmarks.md), per step: per head
    pair the two float64 Grams (4·d·r²), two projections — the direction's and the transported
    moment's — of 8·d·r² each (AᵀZ₁, Z₂ᵀB and the fused update), the invariant metric's step
    bound (8·d·r² more) and two r×r eigendecompositions (≈ 9r³ each); two pairs (QK, OV) per
    layer."""
    d, h = cfg["d_model"], cfg["n_heads"]
    r = d // h
    per_pair = 20 * d * r * r + 18 * r**3 + (8 * d * r * r if metric == "invariant" else 0)
    return 2 * cfg["n_layers"] * h * per_pair


def dressing_flops(cfg: dict) -> float:
    """What re-dressing every step adds to the geometry floor: per head pair the r×r SVD of
    the dressing (≈ 22r³), the action on both factors (4·d·r²) and the dressed point's
    factorisation (two Grams, 4·d·r², and two eigendecompositions, ≈ 18r³)."""
    d, h = cfg["d_model"], cfg["n_heads"]
    r = d // h
    return 2 * cfg["n_layers"] * h * (8 * d * r * r + 40 * r**3)


def newton_schulz_flops(cfg: dict) -> float:
    """Muon's orthogonalisation per step: five quintic iterations on an m×n matrix (m ≤ n) cost
    5·(4m²n + 2m³); per layer four d×d attention projections and the two d×4d MLP matrices."""

    def ns(m: int, n: int) -> float:
        return 5 * (4 * m * m * n + 2 * m**3)

    d = cfg["d_model"]
    return cfg["n_layers"] * (4 * ns(d, d) + 2 * ns(d, 4 * d))


def train_flops(cfg: dict) -> float:
    """Forward + backward of the model on one batch: 6 FLOPs per parameter and token for the
    matrices, plus the attention scores and values (12·T·d per token and layer)."""
    d, layers, vocab = cfg["d_model"], cfg["n_layers"], cfg["vocab"]
    tokens, context = cfg["batch"] * cfg["context"], cfg["context"]
    matrices = layers * 12 * d * d + vocab * d
    return 6 * tokens * matrices + layers * 12 * tokens * context * d


def floor_ratio(cfg: dict, metric: str = "euclidean") -> float:
    """The train-step ratio an ideal quotient step would reach: 1 + geometry / fwd+bwd."""
    return 1 + geometry_flops(cfg, metric) / train_flops(cfg)


def muon_floor_ratios(cfg: dict) -> dict[str, float]:
    """Floors against AdamW of Muon (1 + Newton–Schulz / fwd+bwd) and of QuotientMuon (the
    same plus the geometry and the every-step dressing), and QuotientMuon's against Muon."""
    train, ns = train_flops(cfg), newton_schulz_flops(cfg)
    quotient = ns + geometry_flops(cfg) + dressing_flops(cfg)
    return {
        "muon": 1 + ns / train,
        "qmuon": 1 + quotient / train,
        "qmuon / muon": (train + quotient) / (train + ns),
    }


OptimiserFactory = Callable[[nn.Module], torch.optim.Optimizer]


# ---- optimisers ---------------------------------------------------------------------------------


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def qadam(metric: str = "euclidean", dress_every: int | None = 100) -> OptimiserFactory:
    def make(model: nn.Module) -> torch.optim.Optimizer:
        groups = quotopt.symmetries(model, metric=metric)
        return quotopt.QuotientAdam(
            groups, lr=LR, weight_decay=WEIGHT_DECAY, dress_every=dress_every
        )

    return make


def qsgd(model: nn.Module) -> torch.optim.Optimizer:
    groups = quotopt.symmetries(model)
    return quotopt.QuotientSGD(groups, lr=0.1, momentum=0.9, weight_decay=WEIGHT_DECAY)


def geoopt_stiefel(canonical: bool = True) -> OptimiserFactory:
    """RiemannianAdam with every attention module's wq, wk, wv on Stiefel (modifies the model)."""

    def make(model: nn.Module) -> torch.optim.Optimizer:
        import geoopt

        stiefel_heads(model, canonical=canonical)
        return geoopt.optim.RiemannianAdam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)

    return make


def muon(model: nn.Module) -> torch.optim.Optimizer:
    return baselines.muon_adamw(model, LR, WEIGHT_DECAY)


def qmuon(model: nn.Module) -> torch.optim.Optimizer:
    return baselines.quotient_muon_adamw(model, LR, WEIGHT_DECAY)


def default_optimisers() -> dict[str, OptimiserFactory]:
    optimisers = {
        "adamw": adamw,
        "qadam": qadam(),
        "qadam invariant": qadam("invariant"),
        "qadam dress every step": qadam(dress_every=1),
        "qsgd": qsgd,
        "muon": muon,
        "qmuon": qmuon,
    }
    try:
        import geoopt  # noqa: F401
    except ImportError:
        return optimisers
    optimisers["geoopt stiefel"] = geoopt_stiefel(canonical=True)
    optimisers["geoopt stiefel (euclidean)"] = geoopt_stiefel(canonical=False)
    return optimisers


# ---- the comparison ----------------------------------------------------------------------------


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def random_batches(vocab: int, batch: int, context: int, count: int, device, seed: int = 0):
    """``count`` fixed (tokens, next tokens) batches of uniform random tokens."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(vocab, (count, batch, context + 1), generator=gen)
    return [(d[:, :-1].to(device), d[:, 1:].to(device)) for d in data]


def train_step(model, optimiser, batches, loss_fn=lm_loss, device=None) -> Callable[[], dict]:
    """A closure doing one step on the next batch; returns its fwd+bwd and step times."""
    cycle = itertools.cycle(batches)
    device = torch.device(device) if device is not None else None

    def step() -> dict[str, float]:
        x, y = next(cycle)
        start = clock(device)
        optimiser.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        middle = clock(device)
        optimiser.step()
        end = clock(device)
        return {"fwd+bwd": middle - start, "step": end - middle}

    return step


def compare_optimisers(
    make_model: Callable[[], nn.Module],
    optimisers: dict[str, OptimiserFactory],
    batches,
    repeats: int,
    warmup: int = 2,
    device=None,
    loss_fn=lm_loss,
):
    """Time one train step per optimiser per round (ABAB...), each on its own copy of one model.

    Returns ``alternate``'s timings: per optimiser ``"total"``, ``"fwd+bwd"`` and ``"step"``.
    """
    base = make_model().to(device)
    candidates = {}
    for name, factory in optimisers.items():
        model = copy.deepcopy(base)
        candidates[name] = train_step(model, factory(model), batches, loss_fn, device)
    return alternate(candidates, repeats, warmup=warmup, device=device)


def summarise(times, reference: str = "adamw"):
    """Table rows and a result dict: medians (ms) and paired ratios to ``reference``."""
    ref = times[reference]
    rows, results = [], {}
    for name, t in times.items():
        entry = {
            "train_ms": 1e3 * median(t["total"]),
            "fwd_bwd_ms": 1e3 * median(t["fwd+bwd"]),
            "step_ms": 1e3 * median(t["step"]),
            "train_ratio": paired_ratio(t["total"], ref["total"]),
            "step_ratio": paired_ratio(t["step"], ref["step"]),
        }
        results[name] = entry
        rows.append(
            [
                name,
                entry["train_ms"],
                entry["fwd_bwd_ms"],
                entry["step_ms"],
                entry["train_ratio"],
                entry["step_ratio"],
            ]
        )
    return rows, results


def profile_step(make_model, factory, batches, title: str, steps: int = 3, rows: int = 12):
    """Print the profiler's top operators (self CPU time) of ``steps`` optimiser steps."""
    from torch.profiler import ProfilerActivity, profile

    model = make_model()
    optimiser = factory(model)
    run = train_step(model, optimiser, batches)
    run()
    run()  # past the first step's dressing
    x, y = batches[0]
    optimiser.zero_grad(set_to_none=True)
    lm_loss(model(x), y).backward()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            optimiser.step()
    print(f"\n# profile: {steps} steps of {title} (gradients fixed)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


TABLE_HEADERS = [
    "optimiser",
    "train ms",
    "fwd+bwd ms",
    "step ms",
    "train x AdamW",
    "step x AdamW",
]


TABLE_HEADERS = TABLE_HEADERS + ["floor x AdamW"]


def _model_factory(cfg: dict) -> Callable[[], nn.Module]:
    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return Transformer(
            cfg["vocab"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["context"]
        )

    return make_model


def _with_floor(rows, cfg: dict):
    """Append each row's floor: its geometry (and orthogonalisation) FLOPs over the train
    step's."""
    muons = muon_floor_ratios(cfg)
    out = []
    for row in rows:
        metric = "invariant" if "invariant" in row[0] else "euclidean"
        if row[0] in muons:
            floor = muons[row[0]]
        else:
            floor = floor_ratio(cfg, metric) if row[0].startswith("q") else 1.0
        out.append(row + [floor])
    return out


def _muon_line(times, cfg: dict) -> str:
    """QuotientMuon against Muon: paired train-step and step-only ratios, and the floor."""
    q, m = times["qmuon"], times["muon"]
    return (
        f"# qmuon / muon: train step {paired_ratio(q['total'], m['total']):.2f}x, step() "
        f"{paired_ratio(q['step'], m['step']):.2f}x, floor "
        f"{muon_floor_ratios(cfg)['qmuon / muon']:.2f}x"
    )


def step_only(cfg: dict, optimisers: dict[str, OptimiserFactory], repeats: int, device):
    """Time ``step()`` alone, per optimiser on its own copy of one model with fixed gradients."""
    make_model = _model_factory(cfg)
    ((x, y),) = random_batches(cfg["vocab"], cfg["batch"], cfg["context"], 1, device)
    base = make_model().to(device)
    lm_loss(base(x), y).backward()
    candidates = {}
    for name, factory in optimisers.items():
        model = copy.deepcopy(base)
        for p, q in zip(model.parameters(), base.parameters()):
            p.grad = q.grad.clone()
        candidates[name] = factory(model).step
    return alternate(candidates, repeats, warmup=2, device=device)


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=20)
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 4)")
    parser.add_argument("--profile", action="store_true", help="top operators of qadam's step")
    parser.add_argument(
        "--only-default",
        action="store_true",
        help="skip the 8x-tokens and GPT-2-small runs (implied by --tiny)",
    )
    args = parser.parse_args(argv)
    args.only_default = args.only_default or args.tiny
    setup_threads(args.threads)
    size = "tiny" if args.tiny else "quick" if args.quick else "default"
    cfg = dict(SIZES[size])
    if args.heads:
        cfg["n_heads"] = args.heads
    repeats = args.repeats or (2 if args.tiny else 10 if args.quick else 20)
    print_header(
        "train step, QuotientAdam & co vs AdamW on quotopt.models.Transformer: "
        + ", ".join(f"{k}={v}" for k, v in cfg.items()),
        MODULE,
        argv,
        args.device,
    )
    optimisers = default_optimisers()
    plans = [("default size", cfg)]
    if not args.only_default:
        plans.append(("8x the tokens per step", dict(cfg, batch=8 * cfg["batch"])))
    results = {}  # the default size's rows (the others are printed)
    for title, plan_cfg in plans:
        make_model = _model_factory(plan_cfg)
        batches = random_batches(
            plan_cfg["vocab"], plan_cfg["batch"], plan_cfg["context"], 4, args.device
        )
        times = compare_optimisers(make_model, optimisers, batches, repeats, device=args.device)
        rows, result = summarise(times)
        print(f"\n## {title}: batch {plan_cfg['batch']} x context {plan_cfg['context']}")
        print(f"# {repeats} rounds after 2 warm-up rounds; ratios = medians of per-round ratios;")
        print("# floor = 1 + FLOPs of the ideal quotient geometry / FLOPs of fwd+bwd")
        print(format_table(TABLE_HEADERS, _with_floor(rows, plan_cfg)))
        if "qmuon" in times and "muon" in times:
            print(_muon_line(times, plan_cfg))
        results = results or result
    if not args.only_default:
        shape = dict(GPT2_SMALL) if size == "default" else dict(cfg, n_layers=2)
        names = ("adamw", "qadam", "qadam invariant", "qsgd")
        quotient = {k: v for k, v in optimisers.items() if k in names}
        times = step_only(shape, quotient, max(3, repeats // 4), args.device)
        ref = times["adamw"]["total"]
        rows = [
            [name, 1e3 * median(t["total"]), paired_ratio(t["total"], ref)]
            for name, t in times.items()
        ]
        print(
            "\n## step only at "
            + ", ".join(f"{k}={v}" for k, v in shape.items() if k != "batch")
            + "  (fixed gradients)"
        )
        print(format_table(["optimiser", "step ms", "step x AdamW"], rows))
    if args.profile:
        batches = random_batches(cfg["vocab"], cfg["batch"], cfg["context"], 4, args.device)
        for name in ("qadam", "qadam invariant"):
            profile_step(_model_factory(cfg), optimisers[name], batches, name)
    return results


if __name__ == "__main__":
    main()
