"""The head geometry's two routes side by side: exact factorisations against matmul-only
iterations (``geometry="iterative"``, ``manifolds.iterative``).

Per case, one ``HeadQK`` batch of ``--heads`` heads (default 32: the default benchmark model's
4 layers × 2 pairs × 4 heads, stacked), d = 256, r = 64, float32, at a random point of factor
condition 4:

* ``euclidean`` / ``invariant``: what one QuotientAdam step asks of the geometry — the frame of
  a point and two horizontal projections (the direction's and the transported moment's);
* ``redress``: one re-dressing with a tangent vector carried (QuotientMuon does it every step).

Time is the thread's CPU time (``time.thread_time``), not wall time, so that a loaded machine's
preemption does not enter the figures; one intra-op thread; the routes alternate, and the
median of ``--repeats`` rounds after two warm-up rounds is printed with the median ratio.

    python -m benchmarks.bench_frames
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import manifolds as M
from benchmarks._timing import print_header


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print_header(
        "head geometry, exact vs matmul-only route", "benchmarks.bench_frames", argv, "cpu"
    )
    point = M.HeadQK(args.heads, 256, 64).random_point(
        generator=torch.Generator().manual_seed(0), dtype=torch.float32
    )
    v = tuple(torch.randn_like(t) for t in point)

    def step(bundle):
        frame = bundle.at(point)
        frame.horizontal(v)
        frame.horizontal(v)

    cases = {}
    for metric in ("euclidean", "invariant"):
        exact = M.HeadQK(args.heads, 256, 64, metric)
        iterative = exact.with_geometry("iterative")
        cases[metric] = (lambda b=exact: step(b), lambda b=iterative: step(b))
    exact = M.HeadQK(args.heads, 256, 64)
    iterative = exact.with_geometry("iterative")
    cases["redress"] = (
        lambda: exact.redress(point, v, (v,)),
        lambda: iterative.redress(point, v, (v,)),
    )
    print(f"# {args.heads} heads, d 256, r 64, float32, one thread, CPU time per call")
    print(f"{'case':10s} {'exact ms':>9s} {'iterative ms':>13s} {'ratio':>6s}")
    ratios = {}
    for name, (first, second) in cases.items():
        times = ([], [])
        for _ in range(args.repeats + 2):
            for fn, out in zip((first, second), times):
                start = time.thread_time()
                fn()
                out.append(time.thread_time() - start)
        a, b = times[0][2:], times[1][2:]
        ratio = ratios[name] = statistics.median([y / x for x, y in zip(a, b)])
        print(
            f"{name:10s} {1e3 * statistics.median(a):9.1f} {1e3 * statistics.median(b):13.1f} "
            f"{ratio:6.2f}"
        )
    return ratios


if __name__ == "__main__":
    main()
