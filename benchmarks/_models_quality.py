"""Quality on ``chars`` for ``bench_models``: ``--quality`` (fixed steps) and ``--sweep``.

``--sweep`` is the search for the relational configuration that does best **at equal compute**
The standard 4 × 128 model trains first for the size's number of steps
(``--tiny`` 5, ``--quick`` 100, full 2,000); its wall-clock time W and training FLOPs
N·B·T·f_std (f = ``training_flops_per_token``) set two budgets for every relational
configuration of the grid (channels k, gauge dimension D, head rank r, MLP width m = mult·k,
positions, dressed):

* ``time``: train until the elapsed training time reaches W (checked after each step);
* ``flops``: train round(N·f_std / f_rel) steps, the same arithmetic as the standard run.

The grid runs at seed 0; with ``--seeds N`` the best configuration of each budget (lowest
seed-0 validation loss) and the standard model run again at seeds 1 … N − 1, and a summary
gives the mean gap to the standard model and its spread over seeds (a small selection bias
remains: the best was picked on seed 0, which is among the seeds averaged).

Same optimiser (AdamW, lr 2e-3, weight decay 0.1, as ``--quality``; not tuned per model here),
batch 12, context 64, seed-controlled initialisation and batch order; validation loss on a fixed
subset of validation windows. Every finished run is appended as one JSON line to ``--out``
(default ``sweep_models.jsonl``) and skipped when the sweep is started again with the same
settings, so a long sweep can be stopped and resumed; the standard run's W is read back too, so
the time budget stays the same across resumptions (on a machine whose load changed, W is not
comparable: start a fresh file). The machine's load is recorded with each run.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
from pathlib import Path

import torch

from benchmarks._timing import clock, format_table, median
from benchmarks.bench_models import build, n_params
from quotopt.models import RelationalTransformer
from quotopt.models.flops import training_flops_per_token

BATCH, LR, WEIGHT_DECAY = 12, 2e-3, 0.1


def matched_channels(target: int, vocab: int, max_len: int, d_gauge: int = 4, heads: int = 4):
    """The channel count k (a multiple of ``heads``) whose relational model's parameter count
    is closest to ``target``."""
    best = None
    for k in range(heads, 1025, heads):
        model = RelationalTransformer(vocab, k, d_gauge, 4, heads, max_len)
        gap = abs(n_params(model) - target)
        if best is not None and gap > best[0]:
            break
        best = (gap, k)
    return best[1]


def train_and_evaluate(model, task, steps, batch, lr, max_examples, seed, device, seconds=None):
    """AdamW (weight decay 0.1) for ``steps`` steps — or, with ``seconds``, until that much
    training time has passed — then the validation loss on a fixed subset."""
    gen = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    start, done = clock(), 0
    while (done < steps) if seconds is None else (clock() - start < seconds):
        x, y = task.batch("train", batch, generator=gen, device=device)
        optimiser.zero_grad(set_to_none=True)
        task.loss(model(x), y).backward()
        optimiser.step()
        done += 1
    elapsed = clock() - start
    val = task.evaluate(model, "val", max_examples=max_examples)
    return {"val_loss": val["loss"], "ms_per_step": 1e3 * elapsed / done, "steps": done,
            "seconds": elapsed}  # fmt: skip


def _chars(args):
    from quotopt.lab.tasks import get_task

    context = 16 if args.tiny else 64
    task = get_task("chars", seq_len=context, **({"max_chars": 20_000} if args.tiny else {}))
    max_examples = 20 if args.tiny else 200 if args.quick else 1000
    return task, context, max_examples


def quality(args) -> dict[str, dict]:
    task, context, max_examples = _chars(args)
    steps = 5 if args.tiny else 300 if args.quick else 2000
    vocab = task.vocab_size
    standard = build("standard", context, args.tiny, vocab=vocab)
    k_equal = (16 if args.tiny else 128) // 4
    k_matched = matched_channels(n_params(standard), vocab, context) if not args.tiny else 8
    specs = {
        "standard": dict(kind="standard"),
        f"relational k={k_matched} (equal params)": dict(kind="relational", n_channels=k_matched),
        f"relational k={k_equal} (equal width)": dict(kind="relational"),
    }
    seeds = range(args.seeds)
    print(
        f"# quality: chars, context {context}, batch {BATCH}, {steps} AdamW steps (lr {LR}, "
        f"wd {WEIGHT_DECAY}), val loss on {max_examples} evenly spread validation windows, "
        f"seeds {list(seeds)} (init and batches)"
    )
    runs: dict[str, list[dict]] = {name: [] for name in specs}
    for seed in seeds:
        for name, spec in specs.items():
            model = build(max_len=context, tiny=args.tiny, vocab=vocab, seed=seed, **spec)
            entry = train_and_evaluate(
                model.to(args.device), task, steps, BATCH, LR, max_examples, seed, args.device
            )
            runs[name].append({"params": n_params(model), **entry})
    rows, results = [], {}
    for name, entries in runs.items():
        losses = [e["val_loss"] for e in entries]
        gaps = [e["val_loss"] - s["val_loss"] for e, s in zip(entries, runs["standard"])]
        results[name] = {
            "params": entries[0]["params"],
            "val_loss": statistics.mean(losses),
            "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
            "gap_nats": statistics.mean(gaps),
            "ms_per_step": median([e["ms_per_step"] for e in entries]),
        }
        row = results[name]
        rows.append([name, row["params"], row["val_loss"], row["val_loss_std"], row["gap_nats"],
                     row["ms_per_step"]])  # fmt: skip
    headers = ["model", "params", "val loss", "std", "- standard", "ms/step"]
    print(format_table(headers, rows))
    return results


# ---- the equal-compute sweep ---------------------------------------------------------------------


def sweep_grid(tiny: bool, quick: bool) -> list[dict]:
    """Relational configurations (``RelationalTransformer`` keyword overrides) to try."""
    if tiny:
        return [dict(n_channels=8), dict(n_channels=8, positional="gauge")]
    if quick:
        base = [dict(n_channels=k, d_gauge=4) for k in (32, 64)]
        extra = [dict(positional="gauge"), dict(d_gauge=2), dict(dressed=True)]
        return base + [{"n_channels": 64, "d_gauge": 4, **e} for e in extra]
    grid = []
    for k, D, rank, mult, pos in itertools.product(
        (32, 64, 128), (2, 4, 8), (1, 2), (2, 4), ("alibi", "gauge")
    ):
        grid.append(dict(n_channels=k, d_gauge=D, d_head=rank * k // 4, d_mlp_channels=mult * k,
                         positional=pos))  # fmt: skip
    return grid + [dict(n_channels=64, d_gauge=4, dressed=True)]


def _name(spec: dict) -> str:
    short = {"n_channels": "k", "d_gauge": "D", "d_head": "r", "d_mlp_channels": "m",
             "positional": "pos", "dressed": "dressed"}  # fmt: skip
    return " ".join(f"{short.get(key, key)}={value}" for key, value in spec.items())


def _key(record: dict) -> str:
    return json.dumps({k: record[k] for k in ("name", "budget", "seed", "setting")}, sort_keys=True)


def sweep(args) -> dict[str, dict]:
    task, context, max_examples = _chars(args)
    vocab, steps = task.vocab_size, 5 if args.tiny else 100 if args.quick else 2000
    setting = dict(context=context, batch=BATCH, lr=LR, steps=steps, tiny=args.tiny,
                   examples=max_examples, threads=torch.get_num_threads())  # fmt: skip
    out = Path(args.out)
    records = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    done = {_key(r): r for r in records}
    print(f"# sweep: chars, context {context}, batch {BATCH}, AdamW lr {LR} wd {WEIGHT_DECAY}; "
          f"standard: {steps} steps; budgets: its wall-clock ('time') and its training FLOPs "
          f"('flops'); results {out} ({len(done)} runs already there)")  # fmt: skip

    def run(name, budget, seed, make, **limits):
        record = dict(name=name, budget=budget, seed=seed, setting=setting)
        if _key(record) in done:
            return done[_key(record)]
        model = make().to(args.device)
        entry = train_and_evaluate(model, task, max_examples=max_examples, seed=seed,
                                   device=args.device, batch=BATCH, lr=LR, **limits)  # fmt: skip
        record.update(entry, params=n_params(model),
                      flops_per_token=training_flops_per_token(model, context),
                      load=os.getloadavg()[0] if hasattr(os, "getloadavg") else None)  # fmt: skip
        with out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        done[_key(record)] = record
        return record

    def budgets(seed: int, specs: list[dict]) -> list[dict]:
        """The standard run of ``seed``, then every spec at both budgets."""
        make_std = lambda: build("standard", context, args.tiny, vocab, seed)  # noqa: E731
        std = run("standard", "steps", seed, make_std, steps=steps)
        rows = [std]
        for spec in specs:
            kind = "relational gauge-pos" if spec.get("positional") == "gauge" else "relational"
            make = lambda sp=spec, kd=kind: build(kd, context, args.tiny, vocab, seed, **sp)  # noqa: E731
            f_rel = training_flops_per_token(make().config, context)
            rows.append(run(_name(spec), "time", seed, make, steps=None, seconds=std["seconds"]))
            n = max(1, round(std["steps"] * std["flops_per_token"] / f_rel))
            rows.append(run(_name(spec), "flops", seed, make, steps=n))
        return [{**r, "gap_nats": r["val_loss"] - std["val_loss"]} for r in rows]

    grid = sweep_grid(args.tiny, args.quick)
    rows = budgets(0, grid)  # the search, at seed 0
    best = {}  # budget -> the grid spec with the lowest seed-0 validation loss
    for budget in ("time", "flops"):
        ranked = [(r["val_loss"], i) for i, r in enumerate(rows[1:]) if r["budget"] == budget]
        best[budget] = grid[min(ranked)[1] // 2]
    for seed in range(1, args.seeds):  # more seeds at the best configurations only
        rows += budgets(seed, [dict(t) for t in {tuple(sorted(b.items())) for b in best.values()}])
    results = {f"{r['name']} {r['budget']} seed={r['seed']}": r for r in rows}
    table = [[r["name"], r["budget"], r["seed"], r["params"], r["flops_per_token"] / 1e6,
              r["steps"], r["seconds"], r["val_loss"], r["gap_nats"]] for r in rows]  # fmt: skip
    headers = ["config", "budget", "seed", "params", "MFLOP/tok", "steps", "train s", "val loss",
               "- standard"]  # fmt: skip
    print(format_table(headers, table))
    summary = []
    for budget, spec in best.items():
        gaps = [r["gap_nats"] for r in rows if r["name"] == _name(spec) and r["budget"] == budget]
        spread = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
        summary.append([budget, _name(spec), len(gaps), statistics.mean(gaps), spread])
    print(f"# best configuration per budget (by seed-0 val loss), over {args.seeds} seed(s)")
    print(format_table(["budget", "best config", "seeds", "mean - standard", "std"], summary))
    return results
