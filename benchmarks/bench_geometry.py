"""Cost of the head geometry against one AdamW step, on a GPT-2-small-shaped set of heads.

What is timed. Every attention head of a 12-layer, 12-head, d = 768, r = 64
model, batched over layers *and* heads: one ``HeadQK`` and one ``HeadOV`` bundle with
n_heads = 144, points (Wq, Wk) and (Wv, Wo) of shapes (144, 768, 64) and (144, 64, 768),
float32, GPT-2 initialisation N(0, 0.02²). Per metric ("euclidean", "invariant"), on both
bundles:

* ``projection``: ``project_horizontal(p, grad)``;
* ``transport``: ``transport(p, p', m)`` (horizontal projection at p' = p - 1e-3 m, with m the
  projected gradient, as QuotientAdam's moment);
* ``dressing``: ``dress(p)`` (the canonical balanced representative).

The reference is one ``torch.optim.AdamW`` step (default implementation, as constructed by
``AdamW(params)``; on CPU that is the single-tensor loop) on the same four tensors, and the
fused AdamW kernel is timed as well. Every candidate runs once per round in a fixed order
(ABAB...); the ratios are medians over rounds of the per-round ratio to the AdamW step of the
same round (see ``benchmarks._timing``). Rank checks are disabled (``manifolds.unchecked()``),
as inside the optimisers. ``gemm`` is one (r × d)·(d × r) product over all heads, the unit
that the geometry is made of: a horizontal projection costs 4 such reductions plus 2
(d × r)·(r × r) expansions per bundle, whatever the metric.

Prototypes (rows ``proto ...``; manifolds/ is not edited, the same mathematics is re-written
here to measure what a change would buy; each is checked against the library on the first call):

* a *frame* per point — the Gram matrices and their factorisation (eigh for the Euclidean
  Sylvester solve; for the invariant closed form the r × r inverses from the Cholesky factors,
  ``cholesky_inverse``, so that each solve is a bmm instead of a batched ``cholesky_solve``) —
  computed once and shared by every projection at that point. QuotientAdam projects three
  times per step at two points (gradient and direction at p, moment at p'), and p' is the next
  step's p, so a cached frame turns three factorisations per step into one;
* the final ``Z - A ξ`` fused into the GEMM (``torch.baddbmm``), with B-factor products taken in
  the storage layout (no transposed, strided elementwise passes for Wo);
* the batched r × r factorisations (eigh, svd, Cholesky) run with one intra-op thread on CPU
  (``single_threaded``): torch loops over the batch and MKL threads inside each tiny problem,
  which on a loaded 2-core machine made one batched eigh 20x slower than single-threaded;
* dressing that forms ``A u`` once (the library forms it twice: once to fix the signs, once for
  the result) and fixes the signs from ``amax``/``amin`` instead of ``abs().argmax()`` (no
  temporary of the factor's size).

``projection per layer`` calls the library once per layer (12 bundles of 12 heads), as
``quotopt.symmetries`` groups a real model today: the same work in 12x more, smaller calls.

``proto shared-frame`` is the cost of the composite when the frame of p comes from the previous
step's transport: frame(p') + apply(p) + apply(p') + dressing.

Run ``python -m benchmarks.bench_geometry`` (about a minute on 2 cores), ``--quick`` for 4 layers,
``--profile`` to add the torch profiler's top operators per metric.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Sequence

import torch

import manifolds as M
from benchmarks._timing import (
    add_common_args,
    alternate,
    format_table,
    median,
    paired_ratio,
    print_header,
    setup_threads,
)

MODULE = "benchmarks.bench_geometry"
DRESS_EVERY = 100  # QuotientAdam's default: the dressing is paid once per this many steps


# ---- the tensors -------------------------------------------------------------------------------


def gpt2_heads(n_heads: int, d_model: int, d_head: int, device, seed: int = 0):
    """wq, wk, wv (n, d, r) and wo (n, r, d) as leaf parameters with random gradients."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(n_heads, d_model, d_head)] * 3 + [(n_heads, d_head, d_model)]
    params = []
    for shape in shapes:
        p = torch.nn.Parameter((0.02 * torch.randn(shape, generator=gen)).to(device))
        p.grad = (1e-3 * torch.randn(shape, generator=gen)).to(device)
        params.append(p)
    return params


# ---- prototypes (same mathematics as manifolds/heads.py, restructured) -------------------------
# Factors in storage layout: a is (n, d, r); b is (n, d, r) for QK and Wo (n, r, d) for OV, where
# the bundle's B factor is Woᵀ. Tangent components z1, z2 have the layouts of a and b.


@contextlib.contextmanager
def single_threaded(device: torch.device):
    """Run the batched r x r factorisations (eigh, svd, cholesky) with one intra-op thread on CPU.

    torch loops over the batch and lets MKL/OpenMP thread *inside* each 64 x 64 problem: with
    2 threads on a loaded 2-core machine every parallel region waits for a descheduled thread,
    and a batched eigh of 144 matrices took 0.7-9 s instead of 40-120 ms single-threaded.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _sym(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (x + x.mT)


def _gram_b(b: torch.Tensor, ov: bool) -> torch.Tensor:
    return _sym(b @ b.mT if ov else b.mT @ b)  # BᵀB


def _cross_b(z2: torch.Tensor, b: torch.Tensor, ov: bool) -> torch.Tensor:
    return z2 @ b.mT if ov else z2.mT @ b  # Z₂ᵀB


def proto_frame(a, b, ov: bool, metric: str):
    """Everything the projections at (a, b) share: the factorised Gram matrices."""
    gram_a, gram_b = _sym(a.mT @ a), _gram_b(b, ov)
    with single_threaded(a.device):
        if metric == "euclidean":
            lam, u = torch.linalg.eigh(gram_a)
            mu, v = torch.linalg.eigh(gram_b)
            return ("euclidean", u, v, lam.unsqueeze(-1) + mu.unsqueeze(-2))
        # r x r inverses from the Cholesky factors, after which every solve is a bmm (a batched
        # torch.cholesky_solve of small systems is ~10x slower than the bmm on CPU)
        inv_a = torch.cholesky_inverse(torch.linalg.cholesky_ex(gram_a)[0])
        inv_b = torch.cholesky_inverse(torch.linalg.cholesky_ex(gram_b)[0])
    return ("invariant", inv_a, inv_b)


def proto_apply(a, b, z1, z2, ov: bool, frame):
    """Horizontal part of (z1, z2) at (a, b), given ``proto_frame(a, b, ...)``."""
    c1, c2 = a.mT @ z1, _cross_b(z2, b, ov)
    if frame[0] == "euclidean":  # Sylvester: ξ = U[(Uᵀ(c1 - c2)V) ⊘ (λᵢ + μⱼ)]Vᵀ
        _, u, v, denom = frame
        xi = u @ ((u.mT @ (c1 - c2) @ v) / denom) @ v.mT
    else:  # invariant: ξ = ½[(AᵀA)⁻¹AᵀZ₁ − Z₂ᵀB(BᵀB)⁻¹]
        _, inv_a, inv_b = frame
        xi = 0.5 * (inv_a @ c1 - c2 @ inv_b)
    h1 = torch.baddbmm(z1, a, xi, alpha=-1)  # Z₁ − Aξ
    h2 = torch.baddbmm(z2, xi, b) if ov else torch.baddbmm(z2, b, xi.mT)  # Z₂ + Bξᵀ
    return h1, h2


def proto_dress(a, b, ov: bool):
    """The balanced representative (library's ``dress``), forming A u once."""
    gram_a, gram_b = _sym(a.mT @ a), _gram_b(b, ov)
    with single_threaded(a.device):
        chol_a = torch.linalg.cholesky_ex(gram_a)[0]
        chol_b = torch.linalg.cholesky_ex(gram_b)[0]
        left, s, right_h = torch.linalg.svd(chol_a.mT @ chol_b)  # R_A R_Bᵀ = Ũ S Ṽᵀ
        root = s.sqrt().unsqueeze(-2)
        u = torch.linalg.solve_triangular(chol_a.mT, left * root, upper=True)
        w = torch.linalg.solve_triangular(chol_b.mT, right_h.mT * root, upper=True)  # u⁻ᵀ
    new_a = a @ u
    # largest-|entry| of every column positive: compare the column's max with -min
    signs = torch.where(new_a.amax(-2, keepdim=True) >= -new_a.amin(-2, keepdim=True), 1.0, -1.0)
    new_a.mul_(signs)
    w = w * signs
    return new_a, (w.mT @ b if ov else b @ w)


# ---- candidates ----------------------------------------------------------------------------------


def _library_ops(metric, params, n, d, r) -> dict[str, Callable[[], object]]:
    qk, ov = M.HeadQK(n, d, r, metric), M.HeadOV(n, d, r, metric)
    wq, wk, wv, wo = (p.detach() for p in params)
    points = ((qk, (wq, wk)), (ov, (wv, wo)))
    grads = ((params[0].grad, params[1].grad), (params[2].grad, params[3].grad))
    moments = [bundle.project_horizontal(p, g) for (bundle, p), g in zip(points, grads)]
    moved = [tuple(t - 1e-3 * m for t, m in zip(p, mo)) for (_, p), mo in zip(points, moments)]

    def projection():
        return [bundle.project_horizontal(p, g) for (bundle, p), g in zip(points, grads)]

    def transport():
        return [bundle.transport(p, q, m) for (bundle, p), q, m in zip(points, moved, moments)]

    def dressing():
        return [bundle.dress(p) for bundle, p in points]

    return {"projection": projection, "transport": transport, "dressing": dressing}


def _proto_ops(metric, params) -> dict[str, Callable[[], object]]:
    wq, wk, wv, wo = (p.detach() for p in params)
    points = (((wq, wk), False), ((wv, wo), True))
    grads = ((params[0].grad, params[1].grad), (params[2].grad, params[3].grad))
    frames = [proto_frame(*p, ov, metric) for p, ov in points]
    moments = [proto_apply(*p, *g, ov, f) for (p, ov), g, f in zip(points, grads, frames)]
    moved = [tuple(t - 1e-3 * m for t, m in zip(p, mo)) for (p, _), mo in zip(points, moments)]

    def frame():
        return [proto_frame(*p, ov, metric) for p, ov in points]

    def apply():
        return [proto_apply(*p, *g, ov, f) for (p, ov), g, f in zip(points, grads, frames)]

    def projection():
        return [proto_apply(*p, *g, ov, proto_frame(*p, ov, metric)) for (p, ov), g in
                zip(points, grads)]  # fmt: skip

    def transport():
        return [
            proto_apply(*q, *m, ov, proto_frame(*q, ov, metric))
            for q, m, (_, ov) in zip(moved, moments, points)
        ]

    def dressing():
        return [proto_dress(*p, ov) for p, ov in points]

    return {
        "frame": frame,
        "apply": apply,
        "projection": projection,
        "transport": transport,
        "dressing": dressing,
    }


def check_prototypes(params, n, d, r) -> dict[str, float]:
    """Largest relative deviation of each prototype from the library (float32 round-off)."""
    errors = {}
    for metric in M.METRICS:
        lib, proto = _library_ops(metric, params, n, d, r), _proto_ops(metric, params)
        for name in ("projection", "transport", "dressing"):
            ours, theirs = proto[name](), lib[name]()
            worst = 0.0
            for pair_ours, pair_theirs in zip(ours, theirs):
                for x, y in zip(pair_ours, pair_theirs):
                    worst = max(worst, float((x - y).norm() / y.norm()))
            errors[f"{metric} {name}"] = worst
    return errors


def _gemm_op(params) -> Callable[[], object]:
    a, b = params[0].detach(), params[1].detach()
    return lambda: a.mT @ b


def _per_layer_projection(metric, params, layers, d, r) -> Callable[[], object]:
    """The library projection called once per layer (bundles of n / layers heads), as
    ``quotopt.symmetries`` groups a model today (one HeadQK and one HeadOV group per layer)."""
    per_layer = params[0].shape[0] // layers
    qk, ov = M.HeadQK(per_layer, d, r, metric), M.HeadOV(per_layer, d, r, metric)
    slices = [
        [(t.detach()[i * per_layer : (i + 1) * per_layer], g[i * per_layer : (i + 1) * per_layer])
         for t, g in ((p, p.grad) for p in params)]
        for i in range(layers)
    ]  # fmt: skip

    def projection():
        out = []
        for (wq, gq), (wk, gk), (wv, gv), (wo, go) in slices:
            out.append(qk.project_horizontal((wq, wk), (gq, gk)))
            out.append(ov.project_horizontal((wv, wo), (gv, go)))
        return out

    return projection


def build_candidates(params, n, d, r, layers) -> dict[str, Callable[[], object]]:
    adamw = torch.optim.AdamW(params, lr=1e-3)
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
    candidates: dict[str, Callable[[], object]] = {
        "adamw": adamw.step,
        "adamw fused": fused.step,
        "gemm": _gemm_op(params),
    }
    for metric in M.METRICS:
        for name, fn in _library_ops(metric, params, n, d, r).items():
            candidates[f"{metric} {name}"] = fn
        for name, fn in _proto_ops(metric, params).items():
            candidates[f"{metric} proto {name}"] = fn
        if layers > 1:
            candidates[f"{metric} projection per layer"] = _per_layer_projection(
                metric, params, layers, d, r
            )
    return candidates


# ---- reporting -----------------------------------------------------------------------------------


def summarise(times) -> tuple[list[list[object]], dict[str, dict[str, float]]]:
    """Per metric: library and prototype components, sums, ratios to the AdamW step."""
    ref = times["adamw"]["total"]
    ratio = {name: paired_ratio(t["total"], ref) for name, t in times.items()}
    ms = {name: 1e3 * median(t["total"]) for name, t in times.items()}
    gemm = ratio["gemm"]
    rows: list[list[object]] = []
    results: dict[str, dict[str, float]] = {
        "adamw": {"ms": ms["adamw"], "ratio": 1.0},
        "adamw fused": {"ms": ms["adamw fused"], "ratio": ratio["adamw fused"]},
        "gemm": {"ms": ms["gemm"], "ratio": gemm},
    }
    rows.append(["adamw (reference)", ms["adamw"], 1.0, 1.0 / gemm])
    fused = ratio["adamw fused"]
    rows.append(["adamw fused", ms["adamw fused"], fused, fused / gemm])
    rows.append(["gemm (r×d)·(d×r), all heads", ms["gemm"], gemm, 1.0])

    def per_round_sum(names: Sequence[str], weights: Sequence[float]) -> tuple[float, float]:
        """Median over rounds of the weighted sum (ms) and of its ratio to that round's AdamW."""
        sums = [
            sum(w * t for w, t in zip(weights, ts))
            for ts in zip(*(times[n]["total"] for n in names))
        ]
        return 1e3 * median(sums), paired_ratio(sums, ref)

    for metric in M.METRICS:
        parts = [f"{metric} {c}" for c in ("projection", "transport", "dressing")]
        proto_parts = [f"{metric} proto {c}" for c in ("projection", "transport", "dressing")]
        shared = [f"{metric} proto {c}" for c in ("frame", "apply", "dressing")]
        composites = {
            f"{metric} total": per_round_sum(parts, (1, 1, 1)),
            f"{metric} total, dressing every {DRESS_EVERY}": per_round_sum(
                parts, (1, 1, 1 / DRESS_EVERY)
            ),
            f"{metric} proto total": per_round_sum(proto_parts, (1, 1, 1)),
            f"{metric} proto shared-frame total": per_round_sum(shared, (1, 2, 1)),
        }
        singles = [*parts, *[f"{metric} proto {c}" for c in ("frame", "apply")], *proto_parts]
        singles += [name for name in (f"{metric} projection per layer",) if name in times]
        for name in singles:
            rows.append([name, ms[name], ratio[name], ratio[name] / gemm])
            results[name] = {"ms": ms[name], "ratio": ratio[name]}
        for name, (value_ms, value) in composites.items():
            rows.append([name, value_ms, value, value / gemm])
            results[name] = {"ms": value_ms, "ratio": value}
    return rows, results


def profile_top_ops(params, n, d, r, rows: int = 10) -> None:
    """Print the profiler's top operators (self CPU time) of the library composite per metric."""
    from torch.profiler import ProfilerActivity, profile

    for metric in M.METRICS:
        ops = _library_ops(metric, params, n, d, r)
        with M.unchecked():
            for fn in ops.values():
                fn()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for fn in ops.values():
                    fn()
        print(f"\n# profile: {metric} projection + transport + dressing, both bundles")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser, repeats=7)
    parser.add_argument("--layers", type=int, default=None, help="default 12 (--quick: 4)")
    parser.add_argument("--profile", action="store_true", help="print the top operators")
    args = parser.parse_args(argv)
    setup_threads(args.threads)
    if args.tiny:
        layers, heads, d, r, repeats = 2, 2, 32, 8, 2
    else:
        layers, heads, d, r = (4 if args.quick else 12), 12, 768, 64
        repeats = 3 if args.quick else 7
    layers = args.layers or layers
    repeats = args.repeats or repeats
    n = layers * heads
    print_header(
        f"head geometry vs one AdamW step: {layers} layers x {heads} heads = {n} heads, "
        f"d={d}, r={r}, float32, QK and OV bundles",
        MODULE,
        argv,
        args.device,
    )
    params = gpt2_heads(n, d, r, args.device)
    with M.unchecked():
        errors = check_prototypes(params, n, d, r)
        candidates = build_candidates(params, n, d, r, layers)
        times = alternate(candidates, repeats, device=args.device)
    print("# prototype check (relative deviation from the library): " + ", ".join(
        f"{k} {v:.1e}" for k, v in errors.items()))  # fmt: skip
    rows, results = summarise(times)
    print(f"# {repeats} rounds; ratio = median over rounds of (time / AdamW step of that round)")
    print(format_table(["candidate", "median ms", "x AdamW step", "x gemm"], rows))
    if args.profile:
        profile_top_ops(params, n, d, r)
    results["check"] = errors
    return results


if __name__ == "__main__":
    main()
