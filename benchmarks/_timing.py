"""Shared helpers of the benchmark scripts: side-by-side timing, medians, tables, environment.

The machines these run on are shared and noisy (2 CPU cores, other jobs), so no script reports
an absolute time on its own: every candidate is run once per *round*, in the same order
(A, B, C, A, B, C, ...), and each round's times are divided by the reference's time **of the
same round**. The reported ratio is the median of those paired ratios, which cancels slow drifts
of the machine's load; absolute medians are printed next to it for scale only.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import time
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "add_common_args",
    "alternate",
    "clock",
    "command_line",
    "environment_line",
    "format_table",
    "median",
    "paired_ratio",
    "print_header",
    "rounds_of",
    "setup_threads",
]

Timings = dict[str, dict[str, list[float]]]


def add_common_args(parser: argparse.ArgumentParser, repeats: int) -> None:
    """``--quick``, ``--tiny`` (toy sizes for the smoke test), ``--repeats``, ``--device``,
    ``--threads``."""
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer rounds")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (smoke test, seconds)")
    parser.add_argument("--repeats", type=int, default=None, help=f"rounds (default {repeats})")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )


def setup_threads(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The exact command that reproduces a run, e.g. ``python -m benchmarks.bench_x --quick``."""
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["python", "-m", module, *args])


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_line(device: str | torch.device = "cpu") -> str:
    """torch version, intra-/inter-op threads, CPU model and core count, load, device."""
    device = torch.device(device)
    parts = [
        f"torch {torch.__version__}",
        f"threads {torch.get_num_threads()} (interop {torch.get_num_interop_threads()})",
        f"CPU {_cpu_name()} x{os.cpu_count()}",
    ]
    if hasattr(os, "getloadavg"):
        parts.append("load {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg()))
    if device.type == "cuda":
        parts.append(f"device {torch.cuda.get_device_name(device)}")
    else:
        parts.append(f"device {device}")
    return "# " + " | ".join(parts)


def print_header(title: str, module: str, argv: Sequence[str] | None, device) -> None:
    print(f"# {title}")
    print(f"# command: {command_line(module, argv)}")
    print(environment_line(device))
    cores = os.cpu_count() or 1
    if hasattr(os, "getloadavg") and os.getloadavg()[0] > cores and torch.get_num_threads() > 1:
        print(
            f"# warning: load {os.getloadavg()[0]:.1f} > {cores} cores: with "
            f"{torch.get_num_threads()} threads every parallel region waits for descheduled "
            "threads (batched eigh/svd worst); ratios are less reliable, try --threads 1"
        )


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device | None = None) -> float:
    """``time.perf_counter()`` after waiting for the device's queued work."""
    _sync(device)
    return time.perf_counter()


def alternate(
    candidates: dict[str, Callable[[], object]],
    repeats: int,
    warmup: int = 1,
    device: str | torch.device | None = None,
    budget_s: float | None = None,
    min_repeats: int = 3,
) -> Timings:
    """Run every candidate once per round, in a fixed order (ABAB...), ``warmup`` unrecorded
    rounds first.

    A candidate may return a dict of sub-times in seconds that it measured itself (e.g.
    ``{"step": 0.01}``); they are recorded next to its wall time ``"total"`` (any other return
    value is ignored). Returns
    ``{candidate: {"total": [s, ...], part: [s, ...]}}``, one entry per recorded round.

    ``budget_s``: wall-clock seconds for the whole call, warm-up included. Once at least
    ``min_repeats`` rounds are recorded, no further round starts when the median recorded round
    would end past the budget, so a slow or loaded machine gets fewer rounds (at most
    ``repeats``; ``rounds_of`` counts them). Past twice the budget no further candidate starts,
    whatever ``min_repeats`` says, and the unfinished round is dropped (so a call may record no
    round at all).
    """
    device = torch.device(device) if device is not None else None
    times: Timings = {name: {"total": []} for name in candidates}
    began = clock(device)
    rounds: list[float] = []
    for round_index in range(warmup + repeats):
        if budget_s is not None and len(rounds) >= min_repeats:
            if clock(device) - began + median(rounds) > budget_s:
                break
        round_start = clock(device)
        record: Timings = {name: {} for name in candidates}
        for name, fn in candidates.items():
            start = clock(device)
            if budget_s is not None and start - began > 2 * budget_s:
                return times  # the unfinished round is dropped
            parts = fn()
            record[name]["total"] = [clock(device) - start]
            for part, seconds in (parts if isinstance(parts, dict) else {}).items():
                record[name][part] = [seconds]
        if round_index < warmup:
            continue
        for name, parts in record.items():
            for part, seconds in parts.items():
                times[name].setdefault(part, []).extend(seconds)
        rounds.append(clock(device) - round_start)
    return times


def rounds_of(times: Timings) -> int:
    """How many rounds ``alternate`` recorded."""
    return len(next(iter(times.values()))["total"])


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of numerator[i] / denominator[i] (times of the same round)."""
    return median([a / b for a, b in zip(numerator, denominator, strict=True)])


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, columns right-aligned except the first; floats to 3 significant
    figures (or more where the integer part needs them)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        first = values[0].ljust(widths[0])
        rest = [v.rjust(w) for v, w in zip(values[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(list(headers)), rule, *(line(r) for r in text)])
