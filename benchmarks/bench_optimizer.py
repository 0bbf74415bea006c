"""Train-step cost and step memory of the quotient optimisers against AdamW and Muon.

What is timed. One training step — ``zero_grad``, forward, cross-entropy,
backward, ``step()`` — with each optimiser on its own copy of the same initial model, fed the
same batches, on two models of the default size (4 layers, d = 256, 4 heads of 64, context 128,
batch 8, vocabulary 256; ``--quick``: 2 layers, d = 128, context 64):

* ``quotopt.models.Transformer``;
* Hugging Face ``transformers.LlamaForCausalLM`` (RMSNorm, RoPE, SwiGLU MLP of width 688 — the
  multiple of 16 nearest above 8d/3 —, 4 key/value heads, so no grouping; ``attn_implementation=
  "sdpa"``, ``use_cache=False``, untied read-out), the loss the next-token cross entropy of
  ``model(input_ids).logits``. Its optimisers are built as a user builds them: ``quotopt.
  symmetries(model)`` (every group it finds: per layer RoPE query/key, value/output and the
  MLP's unit rescaling; the rest plain) for QuotientAdam, ``model.parameters()`` for AdamW, and
  the Muon pair below, which take the model as it is.

The optimisers:

* ``adamw``: ``torch.optim.AdamW(model.parameters())`` (torch's default implementation), the
  reference;
* ``qadam``: ``QuotientAdam(quotopt.symmetries(model))`` (Euclidean metric; on the Transformer
  HeadQK + HeadOV per layer, the rest plain AdamW); ``qadam invariant``: the same with
  ``metric="invariant"``; ``qadam dress every step``: ``dress_every=1`` (the default re-dresses
  every 100 steps, so the median step of the other rows is a step without dressing);
  ``qadam iterative``, ``qadam invariant iterative``: the same on the matmul-only route
  (``quotopt.symmetries(model, geometry="iterative")``: the GL(r) head pairs' frames and
  re-dressing by products only; LLaMA's RoPE pairs have no such route and stay exact);
* ``qsgd``: ``QuotientSGD(quotopt.symmetries(model), momentum=0.9)``;
* ``muon``: the study's Muon baseline (``quotopt.lab.baselines.muon_adamw``: ``torch.optim.Muon``
  on the hidden matrices — whole projections of the Transformer, every ``nn.Linear`` but the
  read-out of the LLaMA —, AdamW on the rest); ``qmuon``: the study's QuotientMuon
  (``quotopt.lab.baselines.quotient_muon_adamw``: QuotientMuon with whole-projection scope on the
  factored symmetry groups, re-dressed every step, Muon on the hidden matrices no group covers,
  AdamW on the rest); ``qmuon iterative``: the same on the matmul-only route. Below each
  table, QuotientMuon's ratio to Muon and the iterative route's to the exact one;
* ``geoopt stiefel (euclidean)``: geoopt's ``RiemannianAdam`` with every Transformer layer's
  ``wq``, ``wk``, ``wv`` replaced by one ``geoopt.ManifoldParameter`` of shape (H, d, r) on
  ``geoopt.Stiefel(canonical=False)`` (projection + QR retraction), batched over heads,
  projected onto the manifold first; ``wo`` (H, r, d) has fewer rows than columns, so it stays
  Euclidean (geoopt's Stiefel needs shape[-1] <= shape[-2]), as do embeddings, MLP and
  read-out. ``geoopt stiefel`` (geoopt's default, canonical metric) is timed only where
  ``torch.linalg.solve`` is right on its systems (next paragraph).

**geoopt's canonical Stiefel and batched solves on CPU.** The canonical retraction (a Cayley
transform, ``CanonicalStiefel._transp_follow_one``) solves, per step and parameter, a batch of
H systems (I - A/2) X = [W, M] with A = U Wᵀ - W Uᵀ: ``torch.linalg.solve`` on (H, d, d) float32
with a (H, d, 2r) right-hand side — 4 × (256 × 256) here, contiguous, well conditioned (A is
skew). With more than one intra-op thread, torch's CPU LU (``apply_lu_factor``) factors the
matrices of a batch concurrently, and oneMKL's ``getrf`` is not safe to run that way for
matrices above about 150 × 150: the pivots come back as garbage (zeros, negative, or in range
but wrong), so ``solve`` either fails with ``Intel oneMKL ERROR: Parameter 6 was incorrect on
entry to SLASWP`` and "Pivots given to lu_solve must all be greater or equal to 1", or returns
a wrong solution without a word (relative residuals of 1 to 1e11 measured with 2 threads; right
with 1 thread, with one matrix at a time, and at d <= 128), and a large batch can hang. Nothing
in how the benchmark builds the parameters causes it (the tensors are contiguous, the systems
benign; any batched solve of that size does it: pytorch/pytorch issue 142815), so the row is
checked rather than changed: before timing, a fresh interpreter with the same thread count
solves three batches of such systems; if any residual exceeds 1e-3, fails or takes over a
minute, the row is left out and the reason printed. The Euclidean-metric row does no solve
(projection and QR), so it is always timed. The library's own batched r × r solves
(``HeadQK.act``) meet the same fault at head dimensions above about 150 with several threads.

All use lr 1e-3 (0.1 for SGD) and weight decay 0.01; the numbers are not tuned, only timed.
Candidates run once per round in a fixed order (ABAB...) after one warm-up round; the
train-step ratio is the median over rounds of (train step / AdamW's train step of the same
round), the step-only ratio the same for ``step()`` alone (see ``benchmarks._timing``). The Muon
pair is timed in rounds of its own (AdamW, Muon, QuotientMuon; no warm-up round), against the
AdamW of those rounds, because one Muon step costs seconds on CPUs without bfloat16 matrix
units (below): the other rows get more rounds that way. Threads: torch's default unless
``--threads`` is given; the header prints the count and the load average. Models and
optimisers are built with one thread (``one_thread``; not timed), the steps run with the
count asked for.

**Load.** With two threads on a 2-core machine that other jobs keep busy (load average above
the core count), every parallel region waits for a descheduled thread, and batched LAPACK
calls, which open one per matrix, suffer most: a batched SVD of (4, 256, 64) took 2.2 s with 2
threads at load 3.9 and 3 ms with one; a QuotientAdam step at 6 layers × d 768 took 27 s
against 0.6 s. Rows with such calls (dressing every step, geoopt, QuotientMuon's dressing) are
then inflated far beyond their cost; compare the header's load, and rerun on an idle machine or
with ``--threads 1``.

**The floor column.** The geometry's cost floor per head pair (QK or OV; d the width, r = d/H
the head dimension), in FLOPs per step: two float64 Grams (4·d·r²), two projections — the
direction's and the transported moment's — of 8·d·r² each, and two r×r eigendecompositions
(≈ 9r³ each): 20·d·r² + 18·r³; the invariant metric's step bound adds 8·d·r². Two pairs per
layer, so 2·L·H·(20·d·r² + 18·r³) per step. The floor is 1 + that / the FLOPs of forward and
backward (6 per parameter and token for the matrices, plus 12·T·d per token and layer for the
attention scores); for Muon it is 1 + Newton–Schulz (5·(4m²n + 2m³) per m×n matrix, m <= n) /
fwd+bwd, for QuotientMuon that plus the geometry and the every-step dressing (per pair
8·d·r² + 40·r³). Only the Transformer tables have it (LLaMA's RoPE pair has another geometry).

**The floor of the matmul-only route** (rows ``… iterative``: ``geometry="iterative"``, the head
pairs' frames and re-dressing by Newton–Schulz and Smith-doubling iterations,
``manifolds.iterative``). The d·r² terms are the same; the r³ terms are r×r products (2r³
FLOPs each), counted by ``manifolds.iterative.matmul_counts`` for the parameters' float32 at
the supported Gram condition (1.6e4 at r = 64): per pair and step, Euclidean metric, the
frame's two shifted inverses and the bound's powers (74 products) and two Sylvester solves
(44 each), 162 products ≈ 324·r³ against the exact route's ≈ 18·r³ of eigendecompositions;
invariant metric, Newton–Schulz roots of both Grams (124) and the closed-form projections (4),
≈ 256·r³; re-dressing (QuotientMuon, every step) the balancing element (256) and the dressed
point's frame (74), ≈ 660·r³ against ≈ 40·r³. At r = d/4 an r³ is a quarter of a d·r², so the
route's floor is several times the exact route's in FLOPs: it trades FLOPs for latency (no
eigendecomposition, SVD or Cholesky: only batched products), which pays where small
factorisations are slow against products (GPUs), not on this CPU.

**Muon's precision.** ``torch.optim.Muon`` runs its Newton–Schulz iteration in bfloat16. On a
CPU without bfloat16 matrix units (AVX2 only, as the 2-core AMD EPYC of the figures in
docs/benchmarks.md) torch's bfloat16 matmuls are far slower than float32 ones (31-44× measured
on 256 × 256 and 256 × 1024 matrices): a Muon step on the default model costs about 10 s.
QuotientMuon orthogonalises its groups in float32 and hands only the hidden matrices no group
covers to torch's Muon (the Transformer's MLP, the LLaMA's down projections), so the
qmuon/muon ratio on such a CPU mostly measures bfloat16 against float32 arithmetic, not the
geometry. Each qmuon/muon line is followed by the measurement: ``torch.optim.Muon().step()`` on
a 256 × 256 and a 256 × 1024 matrix against the same Newton–Schulz (torch's operations in
torch's order) in float32, one thread.

**Peak step memory** (``--memory``; part of the full run). Per optimiser (adamw, qadam, qadam
invariant, muon, qmuon) and model shape (``quotopt.models.Transformer``, 6 layers × d 768 with
12 heads of 64, and the GPT-2-small shape, 12 layers; vocabulary 256, context 64, batch 1), a
fresh Python process builds the model and the optimiser and runs 3 training steps
(``benchmarks._memory``), with one intra-op thread (``--memory-threads``; memory, not time, is
measured, and one thread keeps a loaded machine from stalling the steps). Printed: ``built``
(RSS with model and optimiser built, before any gradient or state), ``resting`` (RSS after the
third step, gradients still allocated, the optimiser state alive, freed heap returned to the
system by ``malloc_trim``), ``peak`` (the process's ``ru_maxrss``, its high-water mark reset
just before the first step: the most the steps needed, forward and backward included), peak minus
resting (the step's transient memory) and the ratio of the peak to the base optimiser's
(qadam, qadam invariant: adamw; qmuon: muon). RSS includes the interpreter and torch
(``imported``, printed above the table). On CUDA ``peak`` and ``resting`` are
``torch.cuda.max_memory_allocated`` and ``memory_allocated``. A worker that passes the memory
cap (``--memory-cap-gb``, 8) or the time cap (``--memory-time-cap``, 45 s) is stopped and its
row says where; an optimiser stopped by the time cap at one shape is not run at the larger ones.
On CPUs without bfloat16 matrix units torch's Muon cannot finish three steps at d = 768 within
the cap (one 768 × 768 orthogonalisation alone takes seconds), so the Muon rows there show how
far it got.

**Budget.** The full default run (``python -m benchmarks.bench_optimizer --threads 2``) is sized
to finish within 10 minutes on 2 CPU threads (``TOTAL_S``, 570 s; ``--budget``): the sections,
in the order they run — the Transformer table, the LLaMA table, peak step memory, ``step()``
alone at the GPT-2-small shape (fixed gradients; adamw, qadam, qadam invariant, qsgd), and the
Transformer with 8× the tokens per step (the same rows) — have planned seconds (``PLAN_S``). A
section gets its plan scaled by the fraction of the pending plan that the time left covers
(``Budget``); its rounds stop once that allowance is spent (at least 3 rounds, 2 for the Muon
pair, 1 when the run is behind plan; no candidate starts past twice the allowance; at most
``--repeats``, which, when given, fixes the count instead), a memory process's time cap shrinks
to what is left, and the last two sections run only when their whole plan is left. The total
wall time and the load are printed at the end. ``--only-default`` keeps the two default-size
tables, ``--memory`` runs only the memory part, ``--no-memory`` leaves it out; ``--tiny`` (the
smoke test) leaves it out unless ``--memory`` asks for it, at a toy shape. ``--profile`` adds
the torch profiler's top operators of QuotientAdam's step (both metrics). ``compare_optimisers``
is reused by ``bench_models --optim``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import json
import math
import os
import subprocess
import sys
import time
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
    rounds_of,
    setup_threads,
)
from manifolds.iterative import matmul_counts
from quotopt.lab import baselines
from quotopt.lab.baselines import stiefel_heads
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
#: the peak-memory shapes per size: the optimiser's memory is the point, so batch 1
MEMORY_SHAPES = {
    "default": {
        "6 x 768": dict(GPT2_SMALL, n_layers=6),
        "GPT-2 small": dict(GPT2_SMALL),
    },
    "quick": {"2 x 384": dict(vocab=256, d_model=384, n_layers=2, n_heads=6, context=64, batch=1)},
    "tiny": {"tiny": dict(vocab=32, d_model=16, n_layers=1, n_heads=2, context=8, batch=1)},
}
MEMORY_OPTIMISERS = ("adamw", "qadam", "qadam invariant", "muon", "qmuon")
#: whose peak each row's is compared with
MEMORY_BASE = {"qadam": "adamw", "qadam invariant": "adamw", "qmuon": "muon"}
MEMORY_STEPS = 3
#: planned wall-clock seconds per section of the default size, and the whole run's budget per
#: size (module docstring: Budget); a smaller size scales the plan with its budget
PLAN_S = {
    "transformer": 60,
    "transformer muon": 85,
    "llama": 40,
    "llama muon": 75,
    "memory": 170,
    "gpt2": 35,
    "tokens": 35,
}
TOTAL_S = {"default": 570.0, "quick": 240.0, "tiny": 60.0}  # --tiny: rounds fixed, no budget
MUON_GROUP = ("adamw", "muon", "qmuon", "qmuon iterative")
#: unrecorded rounds first: one (first steps allocate state and dress); none for the Muon pair,
#: whose steps take seconds on CPU, beside which a first step's set-up is noise
WARMUP, MUON_WARMUP = 1, 0
#: a solve residual above this means torch's batched LU went wrong (geoopt's canonical row)
SOLVE_TOLERANCE = 1e-3


def geometry_flops(cfg: dict, metric: str = "euclidean") -> float:
    """The FLOP floor of one quotient step's geometry (module docstring), per step: per head
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


def iterative_geometry_flops(cfg: dict, metric: str = "euclidean") -> float:
    """``geometry_flops`` of the matmul-only route (module docstring): the same d·r² terms, and
    per head pair 2r³ FLOPs per r×r product of the frame and the projections
    (``manifolds.iterative.matmul_counts`` in float32)."""
    d, h = cfg["d_model"], cfg["n_heads"]
    r = d // h
    counts = matmul_counts(torch.float32, r)
    if metric == "invariant":
        per_pair = 28 * d * r * r + 2 * r**3 * (counts["invariant frame"] + 4)
    else:
        per_pair = 20 * d * r * r + 2 * r**3 * (counts["sylvester frame"] + 2 * counts["solve"])
    return 2 * cfg["n_layers"] * h * per_pair


def iterative_dressing_flops(cfg: dict) -> float:
    """``dressing_flops`` of the matmul-only route: the balancing element and the dressed
    point's (Euclidean) frame by r×r products, the action and the Grams (8·d·r²)."""
    d, h = cfg["d_model"], cfg["n_heads"]
    r = d // h
    counts = matmul_counts(torch.float32, r)
    products = counts["balancing"] + counts["sylvester frame"]
    return 2 * cfg["n_layers"] * h * (8 * d * r * r + 2 * r**3 * products)


def matmul_rate(cfg: dict, device, repeats: int = 40) -> float:
    """FLOP/s of the geometry's own products on this machine: the batched d×r Gram products of
    one layer's heads, (H, r, d) @ (H, d, r) in float32 — the best of ``repeats`` timings of 8
    products after one unrecorded, as an ideal step would reach (a median is as noisy as the
    machine's load)."""
    d, h = cfg["d_model"], cfg["n_heads"]
    r, device = d // h, torch.device(device)
    a = torch.randn(h, d, r, device=device)
    times = []
    for _ in range(repeats + 1):
        start = clock(device)
        for _ in range(8):
            a.mT @ a
        times.append((clock(device) - start) / 8)
    return 2 * h * d * r * r / min(times[1:])


def step_floor(cfg: dict, metric: str, adamw_step_s: float, rate: float) -> float:
    """The ``step()`` ratio an ideal quotient step would reach against AdamW's: 1 + the
    geometry's FLOPs (``geometry_flops``) at the products' measured rate / AdamW's step time."""
    return 1 + geometry_flops(cfg, metric) / rate / adamw_step_s


def floor_ratio(cfg: dict, metric: str = "euclidean", geometry: str = "exact") -> float:
    """The train-step ratio an ideal quotient step would reach: 1 + geometry / fwd+bwd."""
    flops = geometry_flops if geometry == "exact" else iterative_geometry_flops
    return 1 + flops(cfg, metric) / train_flops(cfg)


def muon_floor_ratios(cfg: dict) -> dict[str, float]:
    """Floors against AdamW of Muon (1 + Newton–Schulz / fwd+bwd) and of QuotientMuon (the
    same plus the geometry and the every-step dressing), and QuotientMuon's against Muon."""
    train, ns = train_flops(cfg), newton_schulz_flops(cfg)
    quotient = ns + geometry_flops(cfg) + dressing_flops(cfg)
    iterative = ns + iterative_geometry_flops(cfg) + iterative_dressing_flops(cfg)
    return {
        "muon": 1 + ns / train,
        "qmuon": 1 + quotient / train,
        "qmuon iterative": 1 + iterative / train,
        "qmuon / muon": (train + quotient) / (train + ns),
    }


OptimiserFactory = Callable[[nn.Module], torch.optim.Optimizer]


# ---- optimisers ---------------------------------------------------------------------------------


def adamw(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def qadam(
    metric: str = "euclidean", dress_every: int | None = 100, geometry: str = "exact"
) -> OptimiserFactory:
    def make(model: nn.Module) -> torch.optim.Optimizer:
        groups = quotopt.symmetries(model, metric=metric, geometry=geometry)
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


def qmuon_iterative(model: nn.Module) -> torch.optim.Optimizer:
    return baselines.quotient_muon_adamw(model, LR, WEIGHT_DECAY, geometry="iterative")


def _has_geoopt() -> bool:
    try:
        import geoopt  # noqa: F401
    except ImportError:
        return False
    return True


def default_optimisers(geoopt_rows: bool = True) -> dict[str, OptimiserFactory]:
    """Every optimiser of the Transformer table; the geoopt rows where geoopt is installed
    (``geoopt stiefel``, the canonical metric, only when ``canonical_stiefel_check`` passed)."""
    optimisers = {
        "adamw": adamw,
        "qadam": qadam(),
        "qadam invariant": qadam("invariant"),
        "qadam dress every step": qadam(dress_every=1),
        "qadam iterative": qadam(geometry="iterative"),
        "qadam invariant iterative": qadam("invariant", geometry="iterative"),
        "qsgd": qsgd,
        "muon": muon,
        "qmuon": qmuon,
        "qmuon iterative": qmuon_iterative,
    }
    if geoopt_rows and _has_geoopt():
        optimisers["geoopt stiefel"] = geoopt_stiefel(canonical=True)
        optimisers["geoopt stiefel (euclidean)"] = geoopt_stiefel(canonical=False)
    return optimisers


# ---- the comparison ----------------------------------------------------------------------------


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def hf_lm_loss(output, targets: torch.Tensor) -> torch.Tensor:
    """Next-token cross entropy of a Hugging Face causal LM's ``output.logits``."""
    return lm_loss(output.logits, targets)


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


@contextlib.contextmanager
def one_thread():
    """One intra-op thread for what is not timed (building models and optimisers, symmetry
    detection, geoopt's projection of the heads onto Stiefel): on a loaded machine a batched
    SVD with two threads waits on descheduled threads for seconds where one thread takes
    milliseconds. The thread count is restored for the timed steps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def compare_optimisers(
    make_model: Callable[[], nn.Module],
    optimisers: dict[str, OptimiserFactory],
    batches,
    repeats: int,
    warmup: int = 2,
    device=None,
    loss_fn=lm_loss,
    budget_s: float | None = None,
    min_repeats: int = 3,
):
    """Time one train step per optimiser per round (ABAB...), each on its own copy of one model.

    Returns ``alternate``'s timings: per optimiser ``"total"``, ``"fwd+bwd"`` and ``"step"``
    (``budget_s``, ``min_repeats``: see ``alternate``; the clock starts after the models and
    optimisers are built, with one thread: ``one_thread``).
    """
    with one_thread():
        base = make_model().to(device)
        candidates = {}
        for name, factory in optimisers.items():
            model = copy.deepcopy(base)
            candidates[name] = train_step(model, factory(model), batches, loss_fn, device)
    return alternate(
        candidates,
        repeats,
        warmup=warmup,
        device=device,
        budget_s=budget_s,
        min_repeats=min(min_repeats, repeats),
    )


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


# ---- models -------------------------------------------------------------------------------------


def _model_factory(cfg: dict) -> Callable[[], nn.Module]:
    def make_model() -> nn.Module:
        torch.manual_seed(0)
        return Transformer(
            cfg["vocab"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"], cfg["context"]
        )

    return make_model


def swiglu_width(d: int) -> int:
    """LLaMA's MLP width for a model width d: 8d/3 rounded up to a multiple of 16 (688 at
    d = 256)."""
    return 16 * math.ceil(8 * d / 3 / 16)


def llama_config(cfg: dict):
    """A ``transformers.LlamaConfig`` of the benchmark's size (module docstring)."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=cfg["vocab"],
        hidden_size=cfg["d_model"],
        intermediate_size=swiglu_width(cfg["d_model"]),
        num_hidden_layers=cfg["n_layers"],
        num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_heads"],
        max_position_embeddings=max(128, cfg["context"]),
        use_cache=False,
        attn_implementation="sdpa",
    )


def _llama_factory(cfg: dict) -> Callable[[], nn.Module]:
    def make_model() -> nn.Module:
        import transformers

        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(llama_config(cfg))

    return make_model


def memory_setup(spec: dict, device):
    """The model, optimiser, batches and loss of one peak-memory worker (``benchmarks._memory``):
    ``spec["cfg"]`` the Transformer's shape, ``spec["optimiser"]`` one of
    ``MEMORY_OPTIMISERS``."""
    cfg = spec["cfg"]
    model = _model_factory(cfg)().to(device)
    optimiser = default_optimisers(geoopt_rows=False)[spec["optimiser"]](model)
    batches = random_batches(cfg["vocab"], cfg["batch"], cfg["context"], spec["steps"], device)
    return model, optimiser, batches, lm_loss


# ---- helpers of the report ---------------------------------------------------------------------


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
            geometry = "iterative" if "iterative" in row[0] else "exact"
            floor = floor_ratio(cfg, metric, geometry) if row[0].startswith("q") else 1.0
        out.append(row + [floor])
    return out


def _muon_line(times, cfg: dict | None) -> str:
    """QuotientMuon against Muon: paired train-step and step-only ratios (and the floor)."""
    q, m = times["qmuon"], times["muon"]
    line = (
        f"# qmuon / muon: train step {paired_ratio(q['total'], m['total']):.2f}x, step() "
        f"{paired_ratio(q['step'], m['step']):.2f}x"
    )
    if cfg is not None:
        line += f", floor {muon_floor_ratios(cfg)['qmuon / muon']:.2f}x"
    if "qmuon iterative" in times:
        i = times["qmuon iterative"]
        line += (
            f"\n# qmuon iterative / qmuon: train step {paired_ratio(i['total'], q['total']):.2f}x, "
            f"step() {paired_ratio(i['step'], q['step']):.2f}x"
        )
    return line


def _newton_schulz(x: torch.Tensor, coefficients, steps: int, eps: float, dtype) -> torch.Tensor:
    """torch.optim.Muon's Newton–Schulz iteration (its operations, in its order) in ``dtype``."""
    a, b, c = coefficients
    y = x.to(dtype)
    if y.size(0) > y.size(1):
        y = y.T
    y = y / y.norm().clamp(min=eps)
    for _ in range(steps):
        gram = y @ y.T
        update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        y = torch.addmm(y, update, y, beta=a)
    return y


def muon_precision_note(device, shapes=((256, 256), (256, 1024)), repeats: int = 3) -> str:
    """One line: ``torch.optim.Muon``'s step (Newton–Schulz in bfloat16) on one matrix of each
    shape against the same iteration in float32 (medians of ``repeats`` paired rounds after
    one warm-up), with one thread on CPU, so that it compares the arithmetic, not how two
    threads are scheduled on a loaded machine."""
    parts = []
    for rows, cols in shapes:
        gen = torch.Generator().manual_seed(0)
        param = nn.Parameter(torch.randn(rows, cols, generator=gen).to(device))
        param.grad = torch.randn(rows, cols, generator=gen).to(device)
        optimiser = torch.optim.Muon([param], lr=LR)
        defaults = optimiser.defaults
        float32 = functools.partial(
            _newton_schulz,
            param.grad,
            defaults["ns_coefficients"],
            defaults["ns_steps"],
            defaults["eps"],
            torch.float32,
        )
        candidates = {"muon": optimiser.step, "float32": float32}
        with one_thread() if torch.device(device).type == "cpu" else contextlib.nullcontext():
            times = alternate(candidates, repeats, warmup=1, device=device)
        step_ms = 1e3 * median(times["muon"]["total"])
        f32_ms = 1e3 * median(times["float32"]["total"])
        ratio = paired_ratio(times["muon"]["total"], times["float32"]["total"])
        parts.append(f"{rows}x{cols} {step_ms:.3g} ms vs {f32_ms:.3g} ms ({ratio:.0f}x)")
    return (
        "# note: torch.optim.Muon orthogonalises in bfloat16, QuotientMuon in float32; here, "
        "one thread, torch's Muon step vs the same Newton-Schulz in float32: " + ", ".join(parts)
    )


def canonical_stiefel_check(cfg: dict, device) -> str | None:
    """None if ``torch.linalg.solve`` is right on the systems of geoopt's canonical Stiefel
    retraction at this size and thread count; otherwise why not (module docstring).

    Runs in a fresh interpreter (a bad batched LU can hang it): three batches of H systems
    (I - A/2) X = R, A skew, d × d float32, with torch's current intra-op thread count."""
    if torch.device(device).type != "cpu":
        return None
    n, batch, threads = cfg["d_model"], cfg["n_heads"], torch.get_num_threads()
    code = f"""
import json, torch
torch.set_num_threads({threads})
gen = torch.Generator().manual_seed(0)
worst = 0.0
for _ in range(3):
    a = torch.randn({batch}, {n}, {n}, generator=gen) * 1e-3
    lhs = torch.eye({n}) - 0.5 * (a - a.mT)
    rhs = torch.randn({batch}, {n}, 8, generator=gen)
    try:
        x = torch.linalg.solve(lhs, rhs)
        worst = max(worst, float((lhs @ x - rhs).norm() / rhs.norm()))
    except RuntimeError:
        worst = float("inf")
print(json.dumps(worst))
"""
    what = f"torch.linalg.solve on {batch} float32 {n}x{n} systems, {threads} threads"
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
        )
        worst = json.loads(out.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return f"{what}: no answer in 60 s"
    except (IndexError, ValueError):
        return f"{what}: the check did not run"
    if worst <= SOLVE_TOLERANCE:
        return None
    result = "failed (oneMKL SLASWP error)" if math.isinf(worst) else f"residual {worst:.1e}"
    return f"{what}: {result}"


# ---- sections -----------------------------------------------------------------------------------


class Budget:
    """The run's wall-clock allowance, shared out among its sections in the order they run.

    ``plan``: the planned seconds of every section that will run. A section asks for its
    allowance when it starts: its planned seconds times ``share``, the fraction of the still
    pending plan that the time left covers (1 while the run keeps to plan, less when it is
    behind). ``total_s=None``: no allowance (rounds fixed by ``--repeats``)."""

    def __init__(self, total_s: float | None, plan: dict[str, float]):
        self.total_s, self.pending = total_s, dict(plan)
        self.began = time.perf_counter()

    def left(self) -> float:
        return (self.total_s or 0.0) - (time.perf_counter() - self.began)

    def share(self, section: str) -> float:
        """The fraction of its plan that ``section`` would get now (1 without a budget)."""
        if self.total_s is None:
            return 1.0
        pending = sum(self.pending.values())
        return min(1.0, max(0.0, self.left()) / pending) if pending else 0.0

    def allowance(self, section: str) -> tuple[float | None, float]:
        """(seconds for ``section`` or None, share of its plan); removes it from the plan."""
        share = self.share(section)
        planned = self.pending.pop(section, 0.0)
        return (None if self.total_s is None else planned * share), share


def _min_repeats(share: float, usual: int) -> int:
    """``usual`` rounds at least while the run keeps (nearly) to plan, one when behind."""
    return usual if share >= 0.75 else 1


def _rounds_line(times, muon_times) -> str:
    said = f"# {rounds_of(times)} rounds after {WARMUP} warm-up"
    if muon_times is not None:
        said += (
            f" (muon, qmuon: {rounds_of(muon_times)} rounds after {MUON_WARMUP}, with an AdamW "
            "of their own)"
        )
    return said + "; ratios = medians of per-round ratios to the AdamW of the same round"


def timed_table(
    title: str,
    make_model: Callable[[], nn.Module],
    optimisers: dict[str, OptimiserFactory],
    cfg: dict,
    args,
    repeats: int,
    budget: Budget,
    section: str,
    loss_fn=lm_loss,
    floor: bool = True,
    notes: Sequence[str] = (),
    muon_note: Callable[[], str] | None = None,
):
    """Time ``optimisers`` (the Muon pair in rounds of its own, module docstring), print the
    table and the qmuon/muon line; return the rows' results ({} if no round finished)."""
    batches = random_batches(cfg["vocab"], cfg["batch"], cfg["context"], 4, args.device)
    fast = {k: v for k, v in optimisers.items() if k not in MUON_GROUP[1:]}
    slow = {k: v for k, v in optimisers.items() if k in MUON_GROUP}
    slow = slow if {"muon", "qmuon"} & slow.keys() else {}
    common = dict(device=args.device, loss_fn=loss_fn)
    seconds, share = budget.allowance(section)
    times = compare_optimisers(
        make_model,
        fast,
        batches,
        repeats,
        warmup=WARMUP,
        budget_s=seconds,
        min_repeats=_min_repeats(share, 3),
        **common,
    )
    print(f"\n## {title}: batch {cfg['batch']} x context {cfg['context']}")
    if not rounds_of(times):
        print(f"# no round finished within the section's {seconds:.0f} s (machine too slow)")
        return {}
    rows, results = summarise(times)
    muon_times = None
    if slow:
        seconds, share = budget.allowance(section + " muon")
        muon_times = compare_optimisers(
            make_model,
            slow,
            batches,
            repeats,
            warmup=MUON_WARMUP,
            budget_s=seconds,
            min_repeats=_min_repeats(share, 2),
            **common,
        )
        if rounds_of(muon_times):
            slow_rows, slow_results = summarise(muon_times)
            rows += [r for r in slow_rows if r[0] != "adamw"]
            results.update({k: v for k, v in slow_results.items() if k != "adamw"})
        else:
            notes = [*notes, f"# muon, qmuon: no round finished within {seconds:.0f} s"]
            muon_times = None
    order = list(optimisers)
    rows.sort(key=lambda r: order.index(r[0]))
    print(_rounds_line(times, muon_times))
    headers = TABLE_HEADERS if floor else TABLE_HEADERS[:-1]
    if floor:
        print("# floor = 1 + FLOPs of the ideal quotient geometry / FLOPs of fwd+bwd")
        rows = _with_floor(rows, cfg)
    print(format_table(headers, rows))
    for note in notes:
        print(note)
    if muon_times is not None and {"muon", "qmuon"} <= muon_times.keys():
        print(_muon_line(muon_times, cfg if floor else None))
        if muon_note is not None:
            print(muon_note())
    return results


def _memory_row(label: str, name: str, out: dict, peaks: dict) -> list:
    """One row of the memory table: figures, or where the process stopped."""
    base = MEMORY_BASE.get(name)
    built = out.get("built_mib", "-")
    if out["status"] == "ok":
        peak, resting = out["peak_mib"], out["resting_mib"]
        ratio = peak / peaks[base] if base in peaks else "-"
        return [label, name, built, resting, peak, peak - resting, ratio, base or "-"]
    phase = out.get("phase", "start-up")
    if out["status"] == "not run":
        where = f"not run (stopped at {out['stopped_shape']})"
    elif out["status"] == "failed":
        where = f"failed in {phase}: {out.get('error', '')[:60]}"
    else:
        cap = f"{out['cap_s']:.0f} s" if out["status"] == "time cap" else "memory cap"
        where = f"stopped at {out['stopped_at_mib'] / 1024:.2f} GiB ({cap}, in {phase})"
    return [label, name, built, "-", where, "-", "-", base or "-"]


def memory_section(
    shapes: dict[str, dict],
    optimisers: Sequence[str],
    args,
    time_cap_s: float,
    memory_cap_gb: float,
    threads: int | None = 1,
    allowance_s: float | None = None,
) -> dict[str, dict]:
    """Peak step memory, one fresh process per optimiser and shape (module docstring); prints
    the table, returns ``{"memory <shape> <optimiser>": worker result}``.

    Runs the Muon pair last, each optimiser's shapes in the order given; a worker's time cap
    is ``time_cap_s``, or what is left of ``allowance_s`` if less (15 s at least)."""
    from benchmarks._memory import run_worker

    began = time.perf_counter()
    order = [n for n in optimisers if n not in MUON_GROUP] + [
        n for n in optimisers if n in MUON_GROUP
    ]
    results: dict[str, dict] = {}
    for name in order:
        stopped = None
        for label, cfg in shapes.items():
            key = f"memory {label} {name}"
            if stopped is not None:
                results[key] = {"status": "not run", "stopped_shape": stopped}
                continue
            cap = time_cap_s
            if allowance_s is not None:
                cap = min(cap, max(15.0, allowance_s - (time.perf_counter() - began)))
            spec = dict(
                cfg=cfg,
                optimiser=name,
                steps=MEMORY_STEPS,
                threads=threads,
                device=str(args.device),
            )
            results[key] = dict(run_worker(spec, cap, memory_cap_gb * 1024), cap_s=cap)
            if results[key]["status"] == "time cap":
                stopped = label
    rows = []
    for label in shapes:
        peaks = {
            n: results[f"memory {label} {n}"]["peak_mib"]
            for n in optimisers
            if results[f"memory {label} {n}"]["status"] == "ok"
        }
        rows += [_memory_row(label, n, results[f"memory {label} {n}"], peaks) for n in optimisers]
    print(
        f"\n## peak step memory: {MEMORY_STEPS} training steps in a fresh process per row "
        f"(quotopt.models.Transformer, batch 1, {threads or torch.get_num_threads()} thread(s))"
    )
    shapes_said = "; ".join(
        f"{label}: {c['n_layers']} layers, d={c['d_model']}, {c['n_heads']} heads, "
        f"context {c['context']}, vocab {c['vocab']}"
        for label, c in shapes.items()
    )
    print(f"# {shapes_said}")
    if torch.device(args.device).type == "cuda":
        print(
            "# peak, resting: torch.cuda max_memory_allocated / memory_allocated; built: host RSS"
        )
    else:
        print(
            "# built: RSS with model + optimiser built; resting: RSS after step 3 (grads kept, "
            "after malloc_trim); peak: ru_maxrss since step 1"
        )
    imported = [r["imported_mib"] for r in results.values() if "imported_mib" in r]
    if imported:
        print(
            f"# every RSS includes the interpreter with torch imported: {median(imported):.0f} MiB"
        )
    print(
        f"# caps per process: {memory_cap_gb:g} GiB RSS, {time_cap_s:g} s (less if the run is "
        "behind its budget); an optimiser stopped on time is not run at the larger shapes"
    )
    headers = ["shape", "optimiser", "built MiB", "resting MiB", "peak MiB"]
    headers += ["peak-resting MiB", "peak x base", "base"]
    print(format_table(headers, rows))
    return results


def step_only(cfg: dict, optimisers: dict[str, OptimiserFactory], repeats: int, device, **budget):
    """Time ``step()`` alone, per optimiser on its own copy of one model with fixed gradients."""
    make_model = _model_factory(cfg)
    ((x, y),) = random_batches(cfg["vocab"], cfg["batch"], cfg["context"], 1, device)
    with one_thread():
        base = make_model().to(device)
        lm_loss(base(x), y).backward()
        candidates = {}
        for name, factory in optimisers.items():
            model = copy.deepcopy(base)
            for p, q in zip(model.parameters(), base.parameters()):
                p.grad = q.grad.clone()
            candidates[name] = factory(model).step
    return alternate(candidates, repeats, warmup=2, device=device, **budget)


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _behind(title: str, budget: Budget) -> str:
    """An optional section (GPT-2 step only, 8x tokens) runs only with its full plan left."""
    return f"\n## {title}: left out, the run is behind its time budget ({budget.left():.0f} s left)"


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    began = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=20)
    parser.add_argument("--heads", type=int, default=None, help="attention heads (default 4)")
    parser.add_argument("--profile", action="store_true", help="top operators of qadam's step")
    parser.add_argument(
        "--only-default",
        action="store_true",
        help="only the default-size tables: no 8x-tokens, GPT-2-small or memory runs "
        "(implied by --tiny)",
    )
    parser.add_argument("--memory", action="store_true", help="only the peak-memory part")
    parser.add_argument("--no-memory", action="store_true", help="leave the memory part out")
    parser.add_argument(
        "--memory-time-cap", type=float, default=45.0, help="seconds per memory process (45)"
    )
    parser.add_argument(
        "--memory-cap-gb", type=float, default=8.0, help="RSS cap per memory process (8 GiB)"
    )
    parser.add_argument(
        "--memory-threads", type=int, default=1, help="intra-op threads of the memory processes (1)"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole run (default {TOTAL_S['default']:.0f}; rounds adapt)",
    )
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    size = "tiny" if args.tiny else "quick" if args.quick else "default"
    cfg = dict(SIZES[size])
    if args.heads:
        cfg["n_heads"] = args.heads
    repeats = args.repeats or (2 if args.tiny else 10 if args.quick else 20)
    timing = not args.memory
    memory = args.memory or not (args.no_memory or args.only_default or args.tiny)
    extras = timing and not (args.only_default or args.tiny)
    llama = timing and _has_transformers()
    sections = []
    if timing:
        sections += ["transformer", "transformer muon"]
    if llama:
        sections += ["llama", "llama muon"]
    if memory:
        sections.append("memory")
    if extras:
        sections += ["gpt2", "tokens"]
    plan = {k: PLAN_S[k] * (TOTAL_S[size] / TOTAL_S["default"]) for k in sections}
    total = None if args.repeats or args.tiny else (args.budget or TOTAL_S[size])
    budget = Budget(total, plan)
    title = "QuotientAdam & co vs AdamW and Muon"
    if timing:
        title = "train step, " + title + ": " + ", ".join(f"{k}={v}" for k, v in cfg.items())
    else:
        title = "peak step memory, " + title
    print_header(title, MODULE, argv, args.device)
    if total is not None:
        print(f"# time budget {total:.0f} s: rounds per section adapt to it (module docstring)")
    results: dict[str, dict] = {}
    optimisers = default_optimisers()
    if timing:
        note: list[str] = []

        def muon_note() -> str:
            if not note:
                shapes = ((32, 32), (32, 128)) if args.tiny else ((256, 256), (256, 1024))
                note.append(muon_precision_note(args.device, shapes))
            return note[0]

        notes = []
        if "geoopt stiefel" in optimisers:
            reason = canonical_stiefel_check(cfg, args.device)
            if reason is not None:
                del optimisers["geoopt stiefel"]
                notes.append(
                    f"# geoopt stiefel (canonical metric) left out: its retraction's {reason} "
                    "(torch's batched CPU LU with several threads; see the module docstring)"
                )
        results = timed_table(
            f"quotopt.models.Transformer, {size} size",
            _model_factory(cfg),
            optimisers,
            cfg,
            args,
            repeats,
            budget,
            "transformer",
            notes=notes,
            muon_note=muon_note,
        )
        if llama:
            names = ("adamw", "qadam", "qadam invariant", "muon", "qmuon")
            llama_results = timed_table(
                f"transformers.LlamaForCausalLM (SwiGLU {swiglu_width(cfg['d_model'])}, RoPE, "
                f"sdpa), {size} size",
                _llama_factory(cfg),
                {k: optimisers[k] for k in names},
                cfg,
                args,
                repeats,
                budget,
                "llama",
                loss_fn=hf_lm_loss,
                floor=False,
                muon_note=muon_note,
            )
            results.update({f"llama {k}": v for k, v in llama_results.items()})
        else:
            print("\n# transformers is not installed: no LLaMA rows")
    if memory:
        seconds, _ = budget.allowance("memory")
        results.update(
            memory_section(
                MEMORY_SHAPES[size],
                MEMORY_OPTIMISERS,
                args,
                args.memory_time_cap,
                args.memory_cap_gb,
                threads=args.memory_threads,
                allowance_s=seconds,
            )
        )
    if extras:
        names = ("adamw", "qadam", "qadam invariant", "qsgd")
        quotient = {k: optimisers[k] for k in names}
        shape = dict(GPT2_SMALL) if size == "default" else dict(cfg, n_layers=2)
        title = "step only at " + ", ".join(f"{k}={v}" for k, v in shape.items() if k != "batch")
        if budget.share("gpt2") < 1:
            budget.allowance("gpt2")
            print(_behind(title, budget))
        else:
            seconds, share = budget.allowance("gpt2")
            times = step_only(
                shape,
                quotient,
                max(3, repeats // 4),
                args.device,
                budget_s=seconds,
                min_repeats=_min_repeats(share, 3),
            )
            print(f"\n## {title}  (fixed gradients; {rounds_of(times)} rounds after 2 warm-up)")
            if rounds_of(times):
                ref = times["adamw"]["total"]
                rate = matmul_rate(shape, args.device)
                print(
                    "# floor = 1 + FLOPs of the ideal quotient geometry at the best rate of its "
                    f"own products here ({rate / 1e9:.0f} GFLOP/s, float32) / AdamW's step time"
                )
                metrics = {
                    "qadam": "euclidean",
                    "qadam invariant": "invariant",
                    "qsgd": "euclidean",
                }
                rows = [
                    [
                        name,
                        1e3 * median(t["total"]),
                        paired_ratio(t["total"], ref),
                        step_floor(shape, metrics[name], median(ref), rate)
                        if name in metrics
                        else 1.0,
                    ]
                    for name, t in times.items()
                ]
                print(format_table(["optimiser", "step ms", "step x AdamW", "floor x AdamW"], rows))
            else:
                print(
                    f"# no round finished within the section's {seconds:.0f} s (machine too slow)"
                )
        tokens = dict(cfg, batch=8 * cfg["batch"])
        title = "quotopt.models.Transformer, 8x the tokens per step"
        if budget.share("tokens") < 1:
            print(_behind(title, budget))
        else:
            timed_table(
                title,
                _model_factory(tokens),
                quotient,
                tokens,
                args,
                repeats,
                budget,
                "tokens",
            )
    if args.profile:
        batches = random_batches(cfg["vocab"], cfg["batch"], cfg["context"], 4, args.device)
        for name in ("qadam", "qadam invariant"):
            profile_step(_model_factory(cfg), optimisers[name], batches, name)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    said = " | load {:.1f}/{:.1f}/{:.1f}".format(*load) if load else ""
    print(f"\n# total wall time {time.perf_counter() - began:.0f} s{said}")
    return results


if __name__ == "__main__":
    main()
