r"""The quantisation study behind ``quotopt quantise``: every method × seed on one pretrained
byte-level LLaMA (``quotopt.lab.finetune.pretrained``), fake-quantised identically.

Data (fixed): the plays' bytes, split 90/10 (``ByteCorpus.plays``). Calibration: per step
``batch_size`` random windows of the train split drawn from a generator seeded by (seed, step),
so a resumed run sees the same batches. Evaluation: ``n_eval`` windows spread evenly over the
validation split, the same for every method and seed. Per run: the search (``GaugeSearch``,
``steps`` steps at ``lr``, end-to-end loss of the fake-quantised model), the representative
moved in float64 and checked (``represent``, relative logit change ≤ 1e-9), then the
perplexity of the fake-quantised representative and the objectives of ``measure``. A run writes
``runs/<method>-s<seed>.json`` when done and ``runs/<method>-s<seed>.pt`` (the search's state,
``torch.load(weights_only=True)``) every ``CHECKPOINT_EVERY`` steps: ``resume`` skips finished
runs and continues a checkpointed one bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import torch

from ..gauge.fibre import Fibre
from ..gauge.methods import LEARNED, plan_of
from ..gauge.model import LlamaWeights
from ..gauge.objectives import end_to_end, perplexity
from ..gauge.quantisers import QuantSpec
from ..gauge.represent import measure, represent
from ..gauge.search import GaugeSearch
from .training import write_json

__all__ = ["StudyConfig", "study", "report", "figure", "CHECKPOINT_EVERY"]

CHECKPOINT_EVERY = 20


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    bits: str = "W4A4KV4"  # QuantSpec name
    methods: tuple = (
        "rtn",
        "quarot",
        "spinquant",
        "flatquant",
        "residual",
        "heads",
        "units",
        "joint",
    )
    seeds: tuple = (0, 1, 2)  # calibration seeds (batches and Hadamard signs)
    steps: int = 100  # search steps per learned method
    lr: float = 1e-2  # peak rate of the search (linear decay)
    batch_size: int = 8  # calibration windows per step
    n_eval: int = 64  # validation windows for the perplexity


def _batches(data, config: StudyConfig, seed: int):
    def draw(step: int):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return data.batch("train", config.batch_size, gen)

    return draw


def run_one(
    weights64,
    data,
    config: StudyConfig,
    method: str,
    seed: int,
    out: Path,
    resume: bool,
    on_step=None,
) -> dict:
    """One method at one seed (module docstring); returns its result dict."""
    quant = QuantSpec.parse(config.bits)
    weights = weights64.to(torch.float32)
    fibre, batches = Fibre(weights), _batches(data, config, seed)
    steps = config.steps if method in LEARNED else 0
    search = GaugeSearch(
        fibre,
        weights,
        plan_of(method),
        lambda w, step: end_to_end(w, quant, *batches(step)),
        steps,
        config.lr,
        torch.Generator().manual_seed(seed),
    )
    ckpt = out / f"{method}-s{seed}.pt"
    if resume and ckpt.is_file():
        search.load_state_dict(torch.load(ckpt, weights_only=True))

    def step_done(step, loss):
        if step % CHECKPOINT_EVERY == 0 and step < steps:
            torch.save(search.state_dict(), ckpt)
        if on_step is not None:
            on_step(step)

    tic = time.perf_counter()
    search.run(step_done)
    x_eval, y_eval = data.eval_windows("val", config.n_eval)
    moved, change = represent(weights64, fibre, search.elements(), x_eval[:2])
    chosen = moved.to(torch.float32)
    x, y = batches(0)
    result = dict(
        method=method,
        seed=seed,
        bits=quant.name,
        function_change=change,
        perplexity=perplexity(chosen, quant, x_eval, y_eval),
        before=measure(weights, quant, x, y),
        after=measure(chosen, quant, x, y),
        history=search.history,
        seconds=time.perf_counter() - tic,
    )
    ckpt.unlink(missing_ok=True)
    return result


def study(out, model, data, config: StudyConfig, resume: bool = False, progress=None) -> dict:
    """Every method × seed of ``config`` on ``model`` (a pretrained Hugging Face LLaMA, its
    gains folded here); returns ``{"full_precision": ppl, "runs": [result, ...]}``."""
    from ..groups import fold_rms_gains

    model = model.double()
    fold_rms_gains(model)
    weights64 = LlamaWeights.from_hf(model)
    runs_dir = Path(out) / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    x_eval, y_eval = data.eval_windows("val", config.n_eval)
    full = perplexity(weights64.to(torch.float32), None, x_eval, y_eval)
    results = []
    for method in config.methods:
        for seed in config.seeds:
            path = runs_dir / f"{method}-s{seed}.json"
            if resume and path.is_file():
                results.append(json.loads(path.read_text()))
                continue
            steps = config.steps if method in LEARNED else 0
            tick = progress.start(f"{method} s{seed}", steps) if progress else None
            result = run_one(weights64, data, config, method, seed, runs_dir, resume, tick)
            write_json(path, result)
            if progress:
                progress.finish(result)
            results.append(result)
    return dict(full_precision=full, runs=results)


def _by_method(runs) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in runs:
        out.setdefault(r["method"], []).append(r)
    return out


def _mean_sd(values) -> str:
    if any(not math.isfinite(v) for v in values):
        return "inf"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.4f} ± {sd:.4f}" if len(values) > 1 else f"{values[0]:.4f}"


def table(results: dict) -> list[str]:
    """The report's table: per method, perplexity (mean ± sd over seeds), the share of the RTN →
    full-precision gap it closes, and the objectives after the move (seed means)."""
    full, by = results["full_precision"], _by_method(results["runs"])
    rtn = statistics.fmean(r["perplexity"] for r in by.get("rtn", [])) if "rtn" in by else None
    rows = [
        "| method | seeds | perplexity | gap closed | weight error | kurtosis | max/rms | "
        "function change |",
        "|---|---|---|---|---|---|---|---|",
        f"| full precision | – | {full:.4f} | 100% | – | – | – | – |",
    ]
    for method, runs in by.items():
        ppl = [r["perplexity"] for r in runs]
        mean = statistics.fmean(ppl)
        closed = (
            "–"
            if rtn is None or not math.isfinite(mean) or rtn == full
            else f"{100 * (rtn - mean) / (rtn - full):.0f}%"
        )
        after = {k: statistics.fmean(r["after"][k] for r in runs) for k in runs[0]["after"]}
        worst = max(r["function_change"] for r in runs)
        rows.append(
            f"| {method} | {len(runs)} | {_mean_sd(ppl)} | {closed} | "
            f"{after['weight_error']:.4g} | {after['kurtosis']:.3g} | "
            f"{after['max_over_rms']:.3g} | {worst:.1e} |"
        )
    return rows


def report(results: dict, lines: list[str], images: dict[str, str]) -> str:
    """``report.md``: a description, the table, the figures."""
    text = ["# quotopt quantise: the representative that quantises best", ""]
    text += [f"- {line}" for line in lines] + [""] + table(results) + [""]
    text += [f"![{caption}]({path})" for caption, path in images.items()]
    return "\n".join(text) + "\n"


def figure(results: dict, path, window: int = 10) -> None:
    """Perplexity per method (each seed a point, the mean ± sd a bar; full precision a line) and
    the search's calibration loss per learned method (seed mean, moving average over
    ``window`` steps: the batches differ from step to step)."""
    from .plotting import new_figure, save_figure

    fig, (left, right) = new_figure(1, 2, figsize=(11, 4))
    by = _by_method(results["runs"])
    for i, (method, runs) in enumerate(by.items()):
        ppl = [r["perplexity"] for r in runs]
        colour = f"C{i % 10}"
        left.scatter([i] * len(ppl), ppl, s=14, color=colour, alpha=0.6)
        sd = statistics.stdev(ppl) if len(ppl) > 1 else 0.0
        left.errorbar(i + 0.15, statistics.fmean(ppl), yerr=sd, fmt="o", color=colour, capsize=3)
        if runs[0]["history"]:
            mean = torch.tensor([r["history"] for r in runs]).mean(0)
            k = min(window, len(mean))
            smooth = torch.nn.functional.avg_pool1d(mean[None, None], k, 1)[0, 0]
            right.plot(range(k - 1, len(mean)), smooth.numpy(), label=method, color=colour)
    left.axhline(results["full_precision"], color="k", lw=1, label="full precision")
    left.set_xticks(range(len(by)), list(by), rotation=30)
    left.set_ylabel("validation perplexity (fake-quantised)")
    left.legend()
    right.set_xlabel("search step")
    right.set_ylabel(f"calibration loss, {window}-step mean (nats/byte)")
    right.legend()
    save_figure(fig, path)
