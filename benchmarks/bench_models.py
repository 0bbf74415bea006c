"""The relational transformer against the standard one: time, peak memory, quality, optimiser cost.

What is measured. Equal width: ``Transformer`` with d_model = 128, 4 layers,
4 heads of 32, against ``RelationalTransformer`` with k = 32 channels in a gauge space of
d_gauge = 4 (k·d_gauge = 128), 4 layers, 4 heads (channel rank 8, so both attend over 32
features per head), vocabulary 256, batch 1, float32. Two relational position schemes:
``alibi`` (the default; ALiBi as two extra query/key features, fused causal SDPA without a mask)
and ``gauge`` (a position table in the gauge space). Each also at **equal FLOPs**: the channel
count k (a multiple of the 4 heads, d_gauge = 4) whose training FLOPs per token at that T
(``quotopt.models.flops``) are closest to the standard model's; the table prints both FLOP
counts. ``--reference`` adds the materialised-bias ALiBi (``alibi="bias"``) as a before row.

Subnormals. Exact ALiBi drives far-away weights below float32's smallest normal, and x86 cores
process subnormal floats ~100× slower; the feature route leaves those keys out and keeps every
other weight normal (``quotopt.models._relational_attention``, docs/theory/relational.md). The
script sets no process-wide switch (no denormal flushing): it measures what users get.

* **Time** of one forward + backward (cross-entropy on every position) at T = 256 ... 4096
  (``--quick``: up to 1024). Per T, the models run once per round in a fixed order (ABAB...);
  the ratio is the median over rounds of (relational / standard of the same round).
* **Peak memory** of the same forward + backward. On CPU, torch has no allocator statistics and
  ``tracemalloc`` does not see its buffers, so each (model, T) runs in a **fresh subprocess**:
  build the model, run one warm-up forward + backward (lazy initialisation, kernel caches),
  drop the gradients, ``gc.collect()`` and ``malloc_trim(0)`` (so that memory freed by the
  warm-up is given back rather than silently reused), read the resident set size (``VmRSS``),
  reset the high-water mark (``/proc/self/clear_refs``), run the measured forward + backward
  and read the high-water mark (``VmHWM``, what ``getrusage(RUSAGE_SELF).ru_maxrss`` reports).
  The peak is HWM - RSS before: everything the pass needed on top of the model — activations
  kept for backward, gradients, temporaries, allocator slack — to page granularity. Where
  ``/proc`` is unavailable the ``ru_maxrss`` delta is used (it can only undercount). With
  ``--device cuda`` the peak is ``torch.cuda.max_memory_allocated`` minus the memory allocated
  before the pass, in process. Next to it, ``saved MiB``: the distinct storages that autograd
  keeps for the backward pass (``torch.autograd.graph.saved_tensors_hooks``, parameters
  excluded) — the activation memory, exact and independent of the allocator, but blind to
  temporaries that live only inside one operator (e.g. the ALiBi bias's construction).
* ``--quality``: the ``chars`` task (character-level Shakespeare, context 64, batch 12),
  2,000 steps (``--quick``: 300) of AdamW (lr 2e-3, weight decay 0.1, as the design notes'
  probe) from the same seed and batch sequence, for the standard 4 × 128 model, a relational
  model with the channel count k that matches its parameter count (d_gauge = 4), and the
  equal-width relational model (k = 32). Validation loss on a fixed, evenly spread subset of
  validation windows (``task.evaluate(model, "val", max_examples=...)``); ``--seeds N`` repeats
  with N seeds (initialisation and batch order) and reports mean, std and the mean paired gap.
  Target: relational within 0.05 nats of the standard model at equal parameters.
* ``--optim``: the train-step ratio QuotientAdam / AdamW on both equal-width models (context
  128, batch 8), with ``bench_optimizer.compare_optimisers``.

Targets at T = 2048: ALiBi relational time and memory <= 1.3x, gauge positions memory <= 1.3x
the standard model's (equal width).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import bench_optimizer
from benchmarks._timing import (
    add_common_args,
    alternate,
    format_table,
    median,
    paired_ratio,
    print_header,
    setup_threads,
)
from quotopt.models import RelationalTransformer, Transformer
from quotopt.models.flops import training_flops_per_token
from quotopt.models.relational import RelationalConfig

MODULE = "benchmarks.bench_models"
ROOT = Path(__file__).resolve().parents[1]
VOCAB = 256
KINDS = (
    "standard", "relational", "relational gauge-pos", "relational eq-FLOPs",
    "relational gauge-pos eq-FLOPs",
)  # fmt: skip
REFERENCE = "relational bias-alibi"  # --reference: ALiBi by a materialised (1, H, T, T) bias


# ---- models -------------------------------------------------------------------------------------


def _sizes(tiny: bool) -> tuple[int, int, int, int]:
    return (1, 2, 16, 4) if tiny else (4, 4, 128, 4)  # layers, heads, width, d_gauge


def relational_config(k: int, max_len: int, tiny: bool, vocab: int = VOCAB, **overrides):
    """The ``RelationalConfig`` of k channels at this script's depth, heads and d_gauge."""
    layers, heads, _, d_gauge = _sizes(tiny)
    cfg = dict(
        vocab_size=vocab, n_channels=k, d_gauge=d_gauge, n_layers=layers, n_heads=heads,
        max_len=max_len, d_head=max(1, k // heads), d_mlp_channels=4 * k,
    )  # fmt: skip
    return RelationalConfig(**{**cfg, **overrides})


def equal_flops_channels(seq_len: int, tiny: bool, vocab: int = VOCAB, **overrides) -> int:
    """The channel count k (a multiple of the heads) whose relational model's training FLOPs
    per token at ``seq_len`` are closest to the equal-width standard model's."""
    target = training_flops_per_token(build("standard", seq_len, tiny, vocab).config, seq_len)
    heads = _sizes(tiny)[1]
    best = None
    for k in range(heads, 4097, heads):
        flops = training_flops_per_token(relational_config(k, seq_len, tiny, vocab, **overrides),
                                         seq_len)  # fmt: skip
        if best is not None and abs(flops - target) > best[0]:
            break
        best = (abs(flops - target), k)
    return best[1]


def build(kind: str, max_len: int, tiny: bool = False, vocab: int = VOCAB, seed=0, **overrides):
    """One of ``KINDS`` (or ``REFERENCE``): equal width (d_model = k·d_gauge = 128; tiny: 16),
    4 layers, 4 heads; the ``eq-FLOPs`` kinds take k from ``equal_flops_channels(max_len)``."""
    torch.manual_seed(seed)
    layers, heads, width, d_gauge = _sizes(tiny)
    if kind == "standard":
        cfg = dict(d_model=width, n_layers=layers, n_heads=heads, max_len=max_len, **overrides)
        return Transformer(vocab, **cfg)
    k = overrides.pop("n_channels", width // d_gauge)
    cfg = dict(positional="gauge" if "gauge-pos" in kind else "alibi")
    if kind == REFERENCE:
        cfg["alibi"] = "bias"
    cfg = {**cfg, **overrides}
    if kind.endswith("eq-FLOPs"):
        k = equal_flops_channels(max_len, tiny, vocab, **cfg)
    base = dict(n_channels=k, d_gauge=d_gauge, n_layers=layers, n_heads=heads, max_len=max_len)
    return RelationalTransformer(vocab, **{**base, **cfg})


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _fwd_bwd(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> None:
    logits = model(tokens)
    F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()


def _tokens(seq_len: int, device, vocab: int = VOCAB):
    gen = torch.Generator().manual_seed(seq_len)
    data = torch.randint(vocab, (1, seq_len + 1), generator=gen)
    return data[:, :-1].to(device), data[:, 1:].to(device)


# ---- peak memory --------------------------------------------------------------------------------


def _proc_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _release_free_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory_mib(kind: str, seq_len: int, device: str, tiny: bool) -> float:
    """Peak extra memory (MiB) of one forward + backward, in this process (see docstring)."""
    device = torch.device(device)
    model = build(kind, seq_len, tiny).to(device)
    tokens, targets = _tokens(seq_len, device)
    _fwd_bwd(model, tokens, targets)  # warm-up
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        _fwd_bwd(model, tokens, targets)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    _release_free_memory()
    before = _proc_kib("VmRSS")
    if before is not None and _reset_high_water_mark():
        _fwd_bwd(model, tokens, targets)
        return (_proc_kib("VmHWM") - before) / 1024
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    _fwd_bwd(model, tokens, targets)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def saved_for_backward_mib(model: nn.Module, tokens: torch.Tensor, targets: torch.Tensor) -> float:
    """MiB of the distinct tensor storages autograd keeps for the backward pass (parameters
    excluded): what the activations cost, independent of the allocator."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    sizes: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            sizes[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        logits = model(tokens)
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
    del logits, loss
    return sum(sizes.values()) / 2**20


def peak_memory_subprocess(kind: str, seq_len: int, args) -> float:
    """``peak_memory_mib`` in a fresh interpreter (CPU), in process on CUDA."""
    if torch.device(args.device).type == "cuda":
        return peak_memory_mib(kind, seq_len, args.device, args.tiny)
    probe = json.dumps(
        dict(kind=kind, seq_len=seq_len, device=args.device, tiny=args.tiny, threads=args.threads)
    )
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    out = subprocess.run(
        [sys.executable, "-m", MODULE, "--probe", probe],
        cwd=ROOT, env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def _probe(spec: str) -> None:
    options = json.loads(spec)
    setup_threads(options.pop("threads"))
    print(peak_memory_mib(**options))


# ---- time and memory across sequence lengths ----------------------------------------------------


def scaling(seq_lens: Sequence[int], repeats: int, args) -> dict[str, dict]:
    kinds = KINDS + ((REFERENCE,) if args.reference else ())
    rows, results = [], {}
    for seq_len in seq_lens:
        tokens, targets = _tokens(seq_len, args.device)
        models = {kind: build(kind, seq_len, args.tiny).to(args.device) for kind in kinds}

        def run(model, tokens=tokens, targets=targets):
            model.zero_grad(set_to_none=True)
            _fwd_bwd(model, tokens, targets)

        candidates = {kind: (lambda m=m: run(m)) for kind, m in models.items()}
        times = alternate(candidates, repeats, warmup=1, device=args.device)
        memory = {kind: peak_memory_subprocess(kind, seq_len, args) for kind in kinds}
        saved = {kind: saved_for_backward_mib(m, tokens, targets) for kind, m in models.items()}
        flops = {kind: training_flops_per_token(m, seq_len) for kind, m in models.items()}
        ref = times["standard"]["total"]
        for kind in kinds:
            cfg = models[kind].config
            entry = {
                "channels": getattr(cfg, "n_channels", None),
                "params": n_params(models[kind]),
                "mflops_per_token": flops[kind] / 1e6,
                "flops_ratio": flops[kind] / flops["standard"],
                "ms": 1e3 * median(times[kind]["total"]),
                "time_ratio": paired_ratio(times[kind]["total"], ref),
                "peak_mib": memory[kind],
                "memory_ratio": memory[kind] / memory["standard"],
                "saved_mib": saved[kind],
                "saved_ratio": saved[kind] / saved["standard"],
            }
            results[f"{kind} T={seq_len}"] = entry
            rows.append([
                seq_len, kind, entry["channels"] or "-", entry["params"], entry["mflops_per_token"],
                entry["flops_ratio"], entry["ms"], entry["time_ratio"], entry["peak_mib"],
                entry["memory_ratio"], entry["saved_mib"], entry["saved_ratio"],
            ])  # fmt: skip
        del models
    headers = ["T", "model", "k", "params", "train MFLOP/tok", "FLOPs x std", "fwd+bwd ms",
               "time x std", "peak MiB", "memory x std", "saved MiB", "saved x std"]  # fmt: skip
    print(format_table(headers, rows))
    return results


# ---- optimiser cost ---------------------------------------------------------------------------


def optimiser_cost(args) -> dict[str, dict]:
    context, batch = (8, 2) if args.tiny else (128, 8)
    repeats = args.repeats or (2 if args.tiny else 10)
    batches = bench_optimizer.random_batches(VOCAB, batch, context, 4, args.device)
    optimisers = {"adamw": bench_optimizer.adamw, "qadam": bench_optimizer.qadam()}
    rows, results = [], {}
    for kind in KINDS[:2]:
        times = bench_optimizer.compare_optimisers(
            lambda kind=kind: build(kind, context, args.tiny), optimisers, batches, repeats,
            device=args.device,
        )  # fmt: skip
        kind_rows, kind_results = bench_optimizer.summarise(times)
        rows += [[kind, *row] for row in kind_rows]
        results.update({f"{kind} {name}": v for name, v in kind_results.items()})
    print(f"# optimiser cost: context {context}, batch {batch}, {repeats} rounds per model")
    headers = bench_optimizer.TABLE_HEADERS[: len(rows[0]) - 1]  # summarise's columns (no floor)
    print(format_table(["model", *headers], rows))
    return results


def main(argv: Sequence[str] | None = None) -> dict[str, dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=5)
    parser.add_argument("--quality", action="store_true", help="validation loss on chars")
    parser.add_argument("--optim", action="store_true", help="QuotientAdam / AdamW per model")
    parser.add_argument("--sweep", action="store_true", help="equal-compute search on chars")
    parser.add_argument("--out", default="sweep_models.jsonl", help="--sweep: results (JSONL)")
    parser.add_argument("--seeds", type=int, default=1, help="--quality/--sweep: seeds")
    parser.add_argument("--seq-lens", help="comma-separated sequence lengths (default by size)")
    parser.add_argument("--reference", action="store_true", help="add the materialised-bias ALiBi")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args(argv)
    if args.probe:
        _probe(args.probe)
        return {}
    setup_threads(args.threads)
    mode = ("quality" if args.quality else "equal-compute sweep" if args.sweep
            else "optimiser cost" if args.optim else "time and memory")  # fmt: skip
    print_header(f"relational vs standard transformer: {mode}", MODULE, argv, args.device)
    if args.quality or args.sweep:
        from benchmarks import _models_quality  # imports this module: loaded on demand

        return _models_quality.sweep(args) if args.sweep else _models_quality.quality(args)
    if args.optim:
        return optimiser_cost(args)
    if args.tiny:
        seq_lens, repeats = [32], 2
    else:
        seq_lens = [256, 512, 1024] + ([] if args.quick else [2048, 4096])
        repeats = 3 if args.quick else 5
    repeats = args.repeats or repeats
    if args.seq_lens:
        seq_lens = [int(t) for t in args.seq_lens.split(",")]
    print(f"# batch 1; time: {repeats} rounds (ABAB...), median of per-round ratios; eq-FLOPs: "
          "k matching the standard model's training FLOPs per token at that T")  # fmt: skip
    return scaling(seq_lens, repeats, args)


if __name__ == "__main__":
    main()
