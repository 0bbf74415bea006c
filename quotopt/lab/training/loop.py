"""The training loop behind the ``quotopt`` command: a resumable loop that returns its metrics
(library code: no printing).

``train(RunConfig(...), out_dir)`` evaluates every ``eval_every`` steps (one JSON record per
evaluation appended to ``metrics.jsonl``; under a quotient optimiser it includes
``rank_deficient_heads``, the number of heads whose factor Grams were singular at the last step)
and then writes ``checkpoint.pt`` atomically (see ``runs``), holding the directory's
``run_lock`` throughout. ``resume=True`` continues bit for bit from the checkpoint (evaluation
draws no random numbers; records logged after it are dropped) and is refused when the
checkpoint was written with another torch thread count. SIGINT is deferred to the next step
boundary; a ``KeyboardInterrupt`` there, or raised inside a step before the optimiser writes,
saves the last completed step and surfaces as ``Interrupted`` (a ``KeyboardInterrupt``).

The model's symmetry groups are detected once per run (``optimizers.detect``): the gauge
transformation of the start, the optimiser and the logged head diagnostics all read them.

A run *diverges* when its parameters become non-finite or the optimiser refuses a non-finite
step (``NonFiniteStepError``). It then stops at once: the last record is logged (every metric
of a non-finite model is null), the checkpoint is written, and the summary's ``diverged``
holds the step and the reason; ``train`` returns normally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from pathlib import Path

import torch

from ...dynamics import balance_gap, gauge_drift, head_imbalance
from ...groups import gauge_transform, group_point, symmetries
from ...optim import NonFiniteStepError
from .optimizers import build_optimizer, detect
from .registry import TASK_DEFAULTS, build_model, build_task
from .runs import (
    RunConfig,
    append_record,
    check_resumable,
    load_checkpoint,
    prepare_out,
    read_records,
    run_lock,
    save_checkpoint,
    write_json,
    write_text,
)
from .schedule import lr_factor, set_rates

#: seeds the generator of a gauge-transformed start (``RunConfig.gauge_condition``) with
#: ``GAUGE_SALT + seed``, apart from the batch generator (``seed + 1``)
GAUGE_SALT = 7919


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run at ``step``; ``checkpoint``: the resumable file or None."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint = step, checkpoint


def train_step(model, optimizer, task, x, y) -> None:
    """One optimiser step on the batch ``(x, y)``."""
    optimizer.zero_grad(set_to_none=True)
    task.loss(task.logits(model, x), y).backward()
    optimizer.step()


def attention_heads(probes) -> list[dict]:
    """The groups of ``probes`` whose bundle carries a leading head axis with more than one
    group dimension per head: attention heads (GL(r), or the RoPE commutant), not the
    rescaled units of a ReLU layer (one dimension per unit)."""
    out = []
    for group in probes:
        bundle = group.get("bundle")
        if bundle is not None and bundle.per_head and bundle.group_dim > bundle.algebra_shape[0]:
            out.append(group)
    return out


def rebind(groups, model, names: dict[int, str]) -> list[dict]:
    """``groups`` over the model's current parameters: a builder that replaces a parameter by
    another of the same name and shape (geoopt's Stiefel heads) leaves the groups' structure
    as it was; ``names`` maps the old parameters' ids to their names."""
    now = dict(model.named_parameters())
    return [dict(g, params=[now[names[id(p)]] for p in g["params"]]) for g in groups]


def head_probes(model, groups) -> list[dict]:
    """The attention-head groups whose diagnostics a run logs: those of the run's ``groups``;
    where no group shows the heads (the relational model's default joint group holds them
    with its rotations) the head groups alone, ``symmetries(model, residual=False)``."""
    return attention_heads(groups) or attention_heads(symmetries(model, residual=False))


def _finite_model(model) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


@torch.no_grad()
def evaluate(task, model, probes, max_examples=None) -> dict:
    """Train and validation metrics, plus mean gauge drift / head imbalance / balance gap over
    the attention heads of ``probes`` (``head_probes``). A model with non-finite
    parameters has every metric None; so has a non-finite value."""
    out = {}
    for split in ("train", "val"):
        for key, value in task.evaluate(model, split, max_examples=max_examples).items():
            out[f"{split}_{key}"] = value
    finite, heads = _finite_model(model), attention_heads(probes)
    for fn in (gauge_drift, head_imbalance, balance_gap):
        name = fn.__name__
        out[name] = None
        if not finite:
            continue
        # a rank drop has no dressing, hence no drift
        with contextlib.suppress(ValueError, torch.linalg.LinAlgError):
            values = [fn(g["bundle"], group_point(g)).reshape(-1) for g in heads]
            out[name] = float(torch.cat(values).mean()) if values else None
    if not finite:
        return dict.fromkeys(out)
    return {k: v if v is None or math.isfinite(v) else None for k, v in out.items()}


def train(config: RunConfig, out_dir=None, *, resume=False, on_step=None, on_eval=None) -> dict:
    """Train ``config``; returns the summary (also written to ``out_dir/summary.json``).

    ``on_step(step)`` runs after every step, ``on_eval(record)`` after every evaluation.
    ``resume`` continues from ``out_dir/checkpoint.pt`` (same settings and thread count;
    ``steps`` may grow).
    """
    cfg = config.resolved()
    if resume and out_dir is None:
        raise ValueError("resume needs the output directory that holds checkpoint.pt")
    ckpt_path = None if out_dir is None else Path(out_dir) / "checkpoint.pt"
    if resume:  # every check before creating anything
        load_checkpoint(ckpt_path)
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task, cfg.size, cfg.seed)
    check_batch_size(task, cfg)
    if out_dir is None:
        return _train(cfg, task, None, None, on_step, on_eval)
    with run_lock(prepare_out(out_dir)):  # one writer per run directory
        ckpt = load_checkpoint(ckpt_path) if resume else None  # as the lock holder sees it
        if ckpt is not None:
            check_resumable(ckpt, cfg, ckpt_path)
        return _train(cfg, task, Path(out_dir), ckpt, on_step, on_eval)


def check_batch_size(task, cfg: RunConfig) -> None:
    """``ValueError`` unless ``cfg.batch_size`` is 0 (the full split) or at most the number of
    training examples (batches are drawn with replacement: a larger one repeats examples)."""
    n = task.split_sizes["train"]
    if cfg.batch_size > n:
        raise ValueError(
            f"batch_size {cfg.batch_size} exceeds the {n} training examples of {cfg.task} "
            f"{cfg.size}; give at most {n}, or 0 for the full split"
        )


def _before(records: list[dict], step: int) -> list[dict]:
    """The records up to ``step``, one per step in increasing order (a log written past its
    checkpoint, or twice over, keeps only what the checkpoint's run had written)."""
    kept: list[dict] = []
    for r in records:
        if r["step"] <= step and (not kept or r["step"] > kept[-1]["step"]):
            kept.append(r)
    return kept


def _train(cfg: RunConfig, task, out: Path | None, ckpt, on_step, on_eval) -> dict:
    """``train`` once the task is built, the directory held and the checkpoint checked."""
    ckpt_path = None if out is None else out / "checkpoint.pt"
    model = build_model(task, cfg.model, cfg.size, cfg.variant).to(cfg.device)
    groups = detect(cfg.optim, model)  # the run's one detection
    if cfg.gauge_condition is not None:  # the same function in another gauge (same RNG after)
        gauge = torch.Generator().manual_seed(GAUGE_SALT + cfg.seed)
        gauge_transform(model, groups, gauge, cfg.gauge_condition, cfg.gauge_round_trip)
    betas = TASK_DEFAULTS[cfg.task]["betas"]
    names = {id(p): n for n, p in model.named_parameters()}
    args = (cfg.lr, cfg.weight_decay, betas, cfg.task, groups)
    optimizer = build_optimizer(cfg.optim, model, *args)
    base_rates = [group["lr"] for group in optimizer.param_groups]
    probes = head_probes(model, rebind(groups, model, names))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, clock, records, diverged = 0, {"wall": 0.0, "train": 0.0}, [], None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        step, clock = ckpt["step"], dict(ckpt["clock"])
        records = _before(read_records(out), step)
    if out is not None:  # drop records after the checkpoint (written before a crash)
        write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    origin = time.perf_counter() - clock["wall"]

    def log_eval():
        record = dict(step=step, **evaluate(task, model, probes, cfg.eval_examples))
        if hasattr(optimizer, "rank_deficient_heads"):  # quotient optimisers report lost rank
            lost = optimizer.rank_deficient_heads().values()
            record["rank_deficient_heads"] = sum(len(heads) for heads in lost)
        record.update(wall_time=time.perf_counter() - origin, train_time=clock["train"])
        records.append(record)
        if out is not None:
            append_record(out, record)
        if on_eval is not None:
            on_eval(record)

    def save():
        clock["wall"] = time.perf_counter() - origin
        state = dict(
            step=step,
            config=dataclasses.asdict(cfg),
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            data_rng=gen.get_state(),
            torch_rng=torch.get_rng_state(),
            clock=dict(clock),
            threads=torch.get_num_threads(),
        )
        if out is not None:
            save_checkpoint(ckpt_path, state)

    if not records:
        log_eval()
    phase, snapshot = "boundary", None
    try:
        with _deferred_sigint() as pending:
            while step < cfg.steps:
                if pending():
                    raise KeyboardInterrupt
                phase, snapshot = "step", (gen.get_state(), torch.get_rng_state())
                tic = time.perf_counter()
                x, y = task.batch("train", cfg.batch_size or None, generator=gen, device=cfg.device)
                set_rates(optimizer, base_rates, lr_factor(cfg.schedule, step, cfg.steps))
                try:
                    train_step(model, optimizer, task, x, y)
                except NonFiniteStepError as err:  # refused: nothing was written
                    phase = "boundary"
                    diverged = dict(step=step + 1, reason=" ".join(str(err).split()))
                    if records[-1]["step"] != step:
                        log_eval()
                    save()
                    break
                step, phase = step + 1, "boundary"
                clock["train"] += time.perf_counter() - tic
                if on_step is not None:
                    on_step(step)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    log_eval()
                    save()
                    if not _finite_model(model):
                        diverged = dict(step=step, reason="non-finite parameters")
                        break
                    if cfg.stop_at_target and _reached(task, records[-1]):
                        break
    except KeyboardInterrupt as err:
        forced = getattr(err, "forced", False)  # a second Ctrl-C may land mid-write
        if phase == "step" and not forced:  # the step did not happen: undo its batch draw
            gen.set_state(snapshot[0])
            torch.set_rng_state(snapshot[1])
        if out is not None and not forced:
            save()
        raise Interrupted(step, None if forced else ckpt_path) from None
    summary = summarise(cfg, task, model, records, diverged)
    if out is not None:
        write_json(out / "summary.json", summary)
    return summary


def _reached(task, record: dict) -> bool:
    if task.target is None:
        return False
    metric, target = task.target
    value = record.get(f"val_{metric}")
    return value is not None and value >= target


@contextlib.contextmanager
def _deferred_sigint():
    """Within the block a first SIGINT only sets a flag (``pending()``); a second one raises at
    once, marked ``forced``. Outside the main thread nothing is deferred."""
    hits = []
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        hits.append(signum)
        if len(hits) > 1:
            err = KeyboardInterrupt()
            err.forced = True
            raise err

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hits)
    finally:
        signal.signal(signal.SIGINT, previous)


def summarise(cfg: RunConfig, task, model, records: list[dict], diverged=None) -> dict:
    """Final and best values of the task's target metric (validation loss when the task has
    no target; None where a diverged run logged non-finite values), steps to the target;
    ``diverged``: None, or the step at which the run stopped and why."""
    metric, target = task.target if task.target is not None else ("loss", None)
    values = [r[f"val_{metric}"] for r in records]
    finite = [v for v in values if v is not None]
    best = (min if metric == "loss" else max)(finite) if finite else None
    hits = [r["step"] for r, v in zip(records, values) if None not in (v, target) and v >= target]
    last = records[-1]
    return dict(
        config=dataclasses.asdict(cfg),
        n_params=sum(p.numel() for p in model.parameters()),
        metric=metric,
        target=target,
        final=values[-1],
        best=best,
        steps_to_target=hits[0] if hits else None,
        steps=last["step"],
        final_val_loss=last["val_loss"],
        final_train_loss=last["train_loss"],
        ms_per_step=1e3 * last["train_time"] / max(last["step"], 1),
        wall_time=last["wall_time"],
        diverged=diverged,
    )
