"""The training loop behind the ``quotopt`` command: models by task and size, optimisers by
name, and a resumable loop that returns its metrics (library code: no printing).

``train(RunConfig(...), out_dir)`` evaluates every ``eval_every`` steps (one JSON record per
evaluation appended to ``metrics.jsonl``) and then writes ``checkpoint.pt`` atomically: model,
optimiser state, step and the data-generator and torch RNG states, as plain tensors and
containers (``torch.load(path, weights_only=True)`` reads it). ``resume=True`` continues bit
for bit (evaluation draws no random numbers). SIGINT is deferred to the next step boundary;
a ``KeyboardInterrupt`` there, or raised inside a step before the optimiser writes, saves the
last completed step and surfaces as ``Interrupted`` (a ``KeyboardInterrupt``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from manifolds import HeadQK, PositiveRescaling

from . import baselines
from .dynamics import balance_gap, gauge_drift, head_imbalance
from .models import RelationalTransformer, Transformer
from .optim import QuotientAdam, QuotientSGD
from .symmetries import group_point, symmetries
from .tasks import TASKS, get_task

MODELS = ("transformer", "relational")
D_GAUGE = 4  # gauge dimension of relational models; their channel count matches the budget
_TINY = (dict(d_model=8, n_layers=1, n_heads=2, d_mlp=16, activation="relu"), {})
_RELU = dict(n_layers=1, n_heads=4, activation="relu")
#: task -> size -> (Transformer keyword arguments, task options); the first size is the default.
SIZES: dict[str, dict[str, tuple[dict, dict]]] = {
    "modadd": {  # "nanda": Nanda et al. 2023 (1 layer, d=128, 4 heads of 32, ReLU MLP 512)
        "nanda": (dict(_RELU, d_model=128, d_mlp=512), {}),
        "small": (dict(_RELU, d_model=32, d_mlp=128), {"p": 31}),
        "tiny": (_TINY[0], {"p": 11}),
        "quick": (dict(_RELU, d_model=32, d_mlp=128), {"p": 31, "frac_train": 0.5}),
    },
    "sort": {  # small: minGPT's sorting model
        "small": (dict(d_model=48, n_layers=3, n_heads=3), {}),
        "tiny": _TINY,
        "quick": (dict(d_model=32, n_layers=2, n_heads=2), {}),
    },
    "chars": {  # nanoGPT's CPU configuration; tiny: the first 20k characters, context 16
        "small": (dict(d_model=128, n_layers=4, n_heads=4), {}),
        "tiny": (_TINY[0], {"max_chars": 20_000, "seq_len": 16}),
        "quick": (dict(d_model=64, n_layers=2, n_heads=4), {"seq_len": 32}),
    },
    "digits": {
        "small": (dict(d_model=64, n_layers=2, n_heads=4), {}),
        "tiny": _TINY,
        "quick": (dict(d_model=32, n_layers=2, n_heads=2), {}),
    },
}
#: batch size (0: full batch), steps between evaluations, examples per evaluated split (None:
#: all), Adam betas (Nanda's for modadd, minGPT's for sort).
TASK_DEFAULTS = {
    "modadd": dict(batch_size=0, eval_every=100, eval_examples=None, betas=(0.9, 0.98)),
    "sort": dict(batch_size=64, eval_every=100, eval_examples=None, betas=(0.9, 0.95)),
    "chars": dict(batch_size=12, eval_every=250, eval_examples=256, betas=(0.9, 0.99)),
    "digits": dict(batch_size=64, eval_every=100, eval_examples=None, betas=(0.9, 0.999)),
}


def check_name(kind: str, value, valid) -> None:
    if value not in valid:
        raise ValueError(f"unknown {kind} {value!r}; valid names are {', '.join(sorted(valid))}")


def default_size(task_name: str) -> str:
    check_name("task", task_name, TASKS)
    return next(iter(SIZES[task_name]))


def _size(task_name: str, size: str | None) -> tuple[dict, dict]:
    size = size or default_size(task_name)
    check_name(f"size for task {task_name}", size, SIZES[task_name])
    return SIZES[task_name][size]


def build_task(name: str, size: str | None = None, seed: int = 0):
    """The task ``name`` with the options of ``size`` (modadd ``tiny`` uses p = 11)."""
    return get_task(name, seed=seed, **_size(name, size)[1])


def build_model(task, model_name: str = "transformer", size: str | None = None) -> nn.Module:
    """A ``Transformer`` of ``size`` for ``task``, or the ``RelationalTransformer`` (d_gauge
    ``D_GAUGE``) whose channel count k gives the closest parameter count to it."""
    check_name("model", model_name, MODELS)
    kw = dict(_size(task.name, size)[0], vocab_size=task.vocab_size, max_len=task.seq_len)
    kw["n_classes"] = task.n_classes if task.kind == "classify" else None
    if model_name == "transformer":
        return Transformer(**kw)
    rel = {k: v for k, v in kw.items() if k not in ("d_model", "d_mlp", "activation")}
    rel["d_gauge"] = D_GAUGE

    def count(module_fn, **extra):  # parameter count without allocating (meta device)
        with torch.device("meta"):
            return sum(p.numel() for p in module_fn(**extra).parameters())

    budget, h, best = count(Transformer, **kw), kw["n_heads"], None
    for k in range(h, 64 * kw["d_model"], h):  # the count grows with k: stop past the budget
        n = count(RelationalTransformer, n_channels=k, **rel)
        best = (k, n) if best is None or abs(n - budget) < abs(best[1] - budget) else best
        if n >= budget:
            break
    return RelationalTransformer(n_channels=best[0], **rel)


# ---- optimisers: name -> factory(model, lr, weight_decay, betas) and default (lr, wd) ---------
Factory = Callable[[nn.Module, float, float, tuple], torch.optim.Optimizer]
OPTIMIZERS: dict[str, Factory] = {}
HPARAMS: dict[str, dict[str, tuple[float, float]]] = {}  # name -> task or "*" -> (lr, wd)


def register_optimizer(name: str, factory: Factory, lr: float, weight_decay: float, **per_task):
    """Make ``name`` available to ``build_optimizer`` and the CLI; ``per_task`` maps a task
    name to its own ``(lr, weight_decay)`` defaults."""
    OPTIMIZERS[name] = factory
    HPARAMS[name] = {"*": (lr, weight_decay), **per_task}


def default_hparams(name: str, task: str | None) -> tuple[float, float]:
    check_name("optimiser", name, OPTIMIZERS)
    return HPARAMS[name].get(task, HPARAMS[name]["*"])


def build_optimizer(name, model, lr=None, weight_decay=None, betas=(0.9, 0.999), task=None):
    """The optimiser ``name`` over ``model``; lr / weight decay default to ``HPARAMS``."""
    d_lr, d_wd = default_hparams(name, task)
    lr, weight_decay = d_lr if lr is None else lr, d_wd if weight_decay is None else weight_decay
    return OPTIMIZERS[name](model, lr, weight_decay, tuple(betas))


def _qadam(metric: str) -> Factory:
    return lambda m, lr, wd, betas: QuotientAdam(
        symmetries(m, metric=metric), lr=lr, betas=betas, weight_decay=wd
    )


def _adamw(model, lr, wd, betas):
    return torch.optim.AdamW(model.parameters(), lr, betas, weight_decay=wd)


def _sgd(model, lr, wd, betas):
    return torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=wd)


def _qsgd(model, lr, wd, betas):
    return QuotientSGD(symmetries(model), lr, momentum=0.9, weight_decay=wd)


_ADAM = dict(modadd=(1e-3, 1.0), sort=(5e-4, 0.1), chars=(2e-3, 0.1))  # Nanda, minGPT, DESIGN
register_optimizer("adamw", _adamw, 1e-3, 0.1, **_ADAM)
register_optimizer("qadam", _qadam("euclidean"), 1e-3, 0.1, **_ADAM)
register_optimizer("qadam-inv", _qadam("invariant"), 1e-3, 0.1, **_ADAM)
register_optimizer("sgd", _sgd, 0.1, 0.0)
register_optimizer("qsgd", _qsgd, 0.1, 0.0)
# baselines of the study (quotopt.baselines); each may change the model before optimising it
register_optimizer("geoopt-stiefel", baselines.geoopt_stiefel_adam, 1e-3, 0.1, **_ADAM)
register_optimizer("randbias", baselines.random_bias_adamw, 1e-3, 0.1, **_ADAM)
register_optimizer("gaugefix", baselines.gauge_fixed_adamw, 1e-3, 0.1, **_ADAM)
register_optimizer("grokfast", baselines.grokfast, 1e-3, 0.1, **_ADAM)


# ---- the run ---------------------------------------------------------------------------------
@dataclasses.dataclass
class RunConfig:
    task: str
    model: str = "transformer"
    optim: str = "adamw"
    steps: int = 1000  # total optimiser steps (a resumed run continues up to this count)
    seed: int = 0  # task split, initialisation (global torch RNG) and batch order
    size: str | None = None  # None: the task's first size in SIZES
    lr: float | None = None  # None: HPARAMS default for the optimiser and task
    weight_decay: float | None = None  # None: HPARAMS default for the optimiser and task
    batch_size: int | None = None  # None: the task's default; 0: full batch
    eval_every: int | None = None  # None: the task's default
    eval_examples: int | None = None  # examples per evaluated split; None: the task's default
    device: str = "cpu"
    stop_at_target: bool = False  # end at the first evaluation that reaches the task's target

    def resolved(self) -> RunConfig:
        """A copy with the defaults filled in; raises ``ValueError`` on bad names or numbers."""
        check_name("model", self.model, MODELS)
        size = self.size or default_size(self.task)
        _size(self.task, size)
        lr, wd = default_hparams(self.optim, self.task)
        d = TASK_DEFAULTS[self.task]
        # fmt: off
        out = dataclasses.replace(
            self, size=size, lr=lr if self.lr is None else self.lr,
            weight_decay=wd if self.weight_decay is None else self.weight_decay,
            batch_size=d["batch_size"] if self.batch_size is None else self.batch_size,
            eval_every=self.eval_every or d["eval_every"],
            eval_examples=self.eval_examples or d["eval_examples"],
        )
        # fmt: on
        if out.steps < 1 or out.eval_every < 1 or out.batch_size < 0:
            raise ValueError(f"steps and eval_every must be positive, batch_size >= 0: {out}")
        if not (out.lr > 0 and out.weight_decay >= 0):
            raise ValueError(f"need lr > 0 and weight_decay >= 0, got {out.lr}, {out.weight_decay}")
        return out


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run at ``step``; ``checkpoint``: the resumable file or None."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"interrupted at step {step}")
        self.step, self.checkpoint = step, checkpoint


def _train_step(model, optimizer, task, x, y) -> None:
    optimizer.zero_grad(set_to_none=True)
    task.loss(task.logits(model, x), y).backward()
    optimizer.step()


@torch.no_grad()
def evaluate(task, model, probes, max_examples=None) -> dict:
    """Train and validation metrics, plus mean gauge drift / head imbalance / balance gap over
    the attention heads of ``probes`` (``symmetries(model)`` groups)."""
    out = {}
    for split in ("train", "val"):
        for key, value in task.evaluate(model, split, max_examples=max_examples).items():
            out[f"{split}_{key}"] = value
    heads = [g for g in probes if isinstance(g.get("bundle"), HeadQK)]
    heads = [g for g in heads if not isinstance(g["bundle"], PositiveRescaling)]
    for fn in (gauge_drift, head_imbalance, balance_gap):
        name = fn.__name__
        out[name] = None
        with contextlib.suppress(ValueError):  # a rank drop has no dressing, hence no drift
            values = [fn(g["bundle"], group_point(g)).reshape(-1) for g in heads]
            out[name] = float(torch.cat(values).mean()) if values else None
    return {k: v if v is None or math.isfinite(v) else None for k, v in out.items()}


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_json(path, obj) -> None:
    _atomic(Path(path), lambda p: p.write_text(json.dumps(obj, indent=1, allow_nan=False) + "\n"))


def prepare_out(out_dir) -> Path:
    """Create ``out_dir`` and check that it is writable (``OSError`` otherwise)."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").write_text("")
        (out / ".write-test").unlink()
    except OSError as err:
        raise OSError(f"cannot write to output directory {out}: {err.strerror or err}") from None
    return out


def load_checkpoint(path) -> dict:
    """The checkpoint at ``path`` (``weights_only``); ``ValueError`` when missing or corrupt."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no checkpoint at {path} to resume from")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        ckpt["step"], ckpt["config"], ckpt["model"]  # noqa: B018 - the keys must exist
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"checkpoint {path} is unreadable or corrupt ({first})") from None
    return ckpt


def read_records(out_dir) -> list[dict]:
    """The evaluation records in ``out_dir/metrics.jsonl`` (none if there is no log)."""
    log = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def finished_summary(config: RunConfig, out_dir) -> dict | None:
    """The summary in ``out_dir/summary.json`` if that run finished with ``config``'s settings
    (so it can be reused instead of trained again), else None."""
    done = Path(out_dir) / "summary.json"
    if not done.is_file():
        return None
    summary = json.loads(done.read_text())
    return summary if summary["config"] == dataclasses.asdict(config.resolved()) else None


def _check_same_run(saved: dict, cfg: RunConfig, path) -> None:
    keys = ("task", "model", "optim", "seed", "size", "lr", "weight_decay", "batch_size")
    diff = [f"{k}={saved.get(k)!r}, not {getattr(cfg, k)!r}" for k in keys]
    diff = [d for k, d in zip(keys, diff) if saved.get(k) != getattr(cfg, k)]
    if diff:
        raise ValueError(f"checkpoint {path} is from another run: {'; '.join(diff)}")


def train(config: RunConfig, out_dir=None, *, resume=False, on_step=None, on_eval=None) -> dict:
    """Train ``config``; returns the summary (also written to ``out_dir/summary.json``).

    ``on_step(step)`` runs after every step, ``on_eval(record)`` after every evaluation.
    ``resume`` continues from ``out_dir/checkpoint.pt`` (same settings; ``steps`` may grow).
    """
    cfg = config.resolved()
    if resume and out_dir is None:
        raise ValueError("resume needs the output directory that holds checkpoint.pt")
    ckpt_path = None if out_dir is None else Path(out_dir) / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path) if resume else None  # before creating anything
    out = None if out_dir is None else prepare_out(out_dir)
    if ckpt is not None:
        _check_same_run(ckpt["config"], cfg, ckpt_path)
        if ckpt["step"] > cfg.steps:
            raise ValueError(
                f"checkpoint {ckpt_path} is at step {ckpt['step']} > steps {cfg.steps}"
            )
    torch.manual_seed(cfg.seed)
    task = build_task(cfg.task, cfg.size, cfg.seed)
    model = build_model(task, cfg.model, cfg.size).to(cfg.device)
    betas = TASK_DEFAULTS[cfg.task]["betas"]
    optimizer = build_optimizer(cfg.optim, model, cfg.lr, cfg.weight_decay, betas, cfg.task)
    probes, gen = symmetries(model), torch.Generator().manual_seed(cfg.seed + 1)
    step, clock, records = 0, {"wall": 0.0, "train": 0.0}, []
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        gen.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        step, clock = ckpt["step"], dict(ckpt["clock"])
        records = [r for r in read_records(out) if r["step"] <= step]
    if out is not None:  # drop records after the checkpoint (written before a crash)
        text = "".join(json.dumps(r) + "\n" for r in records)
        _atomic(out / "metrics.jsonl", lambda p: p.write_text(text))
    origin = time.perf_counter() - clock["wall"]

    def log_eval():
        record = dict(step=step, **evaluate(task, model, probes, cfg.eval_examples))
        record.update(wall_time=time.perf_counter() - origin, train_time=clock["train"])
        records.append(record)
        if out is not None:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        if on_eval is not None:
            on_eval(record)

    def save():
        clock["wall"] = time.perf_counter() - origin
        # fmt: off
        state = dict(step=step, config=dataclasses.asdict(cfg), model=model.state_dict(),
                     optimizer=optimizer.state_dict(), data_rng=gen.get_state(),
                     torch_rng=torch.get_rng_state(), clock=dict(clock))
        # fmt: on
        if out is not None:
            _atomic(ckpt_path, lambda p: torch.save(state, p))

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
                _train_step(model, optimizer, task, x, y)
                step, phase = step + 1, "boundary"
                clock["train"] += time.perf_counter() - tic
                if on_step is not None:
                    on_step(step)
                if step % cfg.eval_every == 0 or step == cfg.steps:
                    log_eval()
                    save()
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
    summary = summarise(cfg, task, model, records)
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


def summarise(cfg: RunConfig, task, model, records: list[dict]) -> dict:
    """Final and best values of the task's target metric (validation loss when the task has
    no target; None where a diverged run logged non-finite values), steps to the target."""
    metric, target = task.target if task.target is not None else ("loss", None)
    values = [r[f"val_{metric}"] for r in records]
    finite = [v for v in values if v is not None]
    best = (min if metric == "loss" else max)(finite) if finite else None
    hits = [r["step"] for r, v in zip(records, values) if None not in (v, target) and v >= target]
    last = records[-1]
    # fmt: off
    return dict(
        config=dataclasses.asdict(cfg), n_params=sum(p.numel() for p in model.parameters()),
        metric=metric, target=target, final=values[-1], best=best,
        steps_to_target=hits[0] if hits else None, steps=last["step"],
        final_val_loss=last["val_loss"], final_train_loss=last["train_loss"],
        ms_per_step=1e3 * last["train_time"] / max(last["step"], 1), wall_time=last["wall_time"],
    )
    # fmt: on
