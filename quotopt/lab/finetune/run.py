"""One LoRA fine-tuning run: the pretrained model, ``peft`` adapters on q/k/v/o, one optimiser.

``FinetuneConfig`` fixes everything; ``finetune(config, run_dir, base)`` trains and writes the
run's files as ``quotopt.lab.training`` does — ``metrics.jsonl`` (one record per evaluation:
``step``, ``val_loss`` and ``train_loss`` in nats per byte, ``seconds``) and ``summary.json``
(``config``, ``final_val_loss``, ``best_val_loss``, ``ms_per_step``, ``wall_time``,
``diverged``) — and returns the summary; ``finished(config, run_dir)`` is that summary when the
directory holds a finished run of the same configuration (``--resume`` reuses it).

Adapters: ``peft.LoraConfig(r, lora_alpha=alpha, target_modules=q/k/v/o_proj,
lora_dropout=0)``: A Kaiming-uniform, B = 0, ΔW = (α/r)·B A. α is fixed (16) across ranks,
as Hu et al. (2021) do ("we simply set α to the first r we try and do not tune it"), so the
scaling α/r spares retuning the learning rate when r changes — the premise the study tests.
The adapters' initialisation draws from the global RNG seeded with ``seed``; batches come from
a ``torch.Generator`` seeded with ``seed``; evaluation uses fixed windows (no randomness).
Constant learning rate, no weight decay, no gradient clipping: the optimisers alone differ.

A run *diverges* when its loss becomes non-finite or the optimiser refuses a non-finite step;
it stops there with ``diverged`` = ``{"step", "reason"}`` and the last finite records.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch

from ...optim import NonFiniteStepError
from ..training.optimizers import build_adapter_optimizer
from ..training.runs import append_record, prepare_out, write_json
from .data import ByteCorpus
from .pretrain import PretrainConfig, lm_loss, mean_loss

__all__ = ["TARGETS", "FinetuneConfig", "add_adapters", "finetune", "finished"]

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass
class FinetuneConfig:
    optim: str = "adamw"  # an adapter optimiser of the registry (training.optimizers)
    task: str = "stdlib"  # the fine-tuning text: a name of data.TASKS
    rank: int = 16  # LoRA rank r
    lr: float = 1e-3  # learning rate (of A for loraplus)
    seed: int = 0  # adapter initialisation and batch order
    steps: int = 300  # optimiser steps
    ratio: float = 16.0  # LoRA+'s η_B / η_A (loraplus only)
    damping: float = 1e-2  # δ of the damped invariant metric / scaled-GD preconditioner
    alpha: float = 16.0  # LoRA α (scaling α / r)
    batch_size: int = 8  # windows per step
    seq_len: int = 64  # fine-tuning window (≤ the pretrained context)
    eval_every: int = 25  # steps between validation evaluations
    n_eval: int = 64  # validation windows (spread over the held-out files)
    max_bytes: int | None = None  # only the first bytes of each split (tiny test sizes)
    pretrain: dict = dataclasses.field(default_factory=lambda: dataclasses.asdict(PretrainConfig()))


def add_adapters(base, rank: int, alpha: float, seed: int):
    """A ``peft`` model with LoRA adapters on ``TARGETS`` of a deep copy of ``base``."""
    import peft

    torch.manual_seed(seed)
    config = peft.LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(TARGETS), lora_dropout=0.0
    )
    return peft.get_peft_model(copy.deepcopy(base), config)


def finished(config: FinetuneConfig, run_dir) -> dict | None:
    """The summary of a finished run of ``config`` in ``run_dir``, else None."""
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    saved = summary.get("config")
    if isinstance(saved, dict):  # runs saved before the task field were stdlib runs
        saved = {"task": "stdlib", **saved}
    return summary if saved == dataclasses.asdict(config) else None


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def finetune(
    config: FinetuneConfig, run_dir, base, data: ByteCorpus | None = None, on_step=None
) -> dict:
    """Train ``config`` from the pretrained ``base`` (not modified); writes ``run_dir`` (module
    docstring); ``on_step(step)`` is called after every step (progress bars)."""
    if config.seq_len > config.pretrain["seq_len"]:
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the pretrained context {config.pretrain['seq_len']}"
        )
    out = prepare_out(run_dir)
    for name in ("metrics.jsonl", "summary.json"):
        (out / name).unlink(missing_ok=True)
    data = data or ByteCorpus.task(config.task, config.seq_len, config.max_bytes)
    model = add_adapters(base, config.rank, config.alpha, config.seed)
    model.train()
    hyper = dict(ratio=config.ratio, damping=config.damping)
    optimizer = build_adapter_optimizer(config.optim, model, config.lr, **hyper)
    gen = torch.Generator().manual_seed(config.seed)
    val_x, val_y = data.eval_windows("val", config.n_eval)
    records, diverged, train_losses, step_time = [], None, [], 0.0

    def log(step):
        val = _finite(mean_loss(model, val_x, val_y))
        recent = train_losses[-config.eval_every :]
        train = _finite(sum(recent) / len(recent)) if recent else None
        record = dict(step=step, val_loss=val, train_loss=train, seconds=step_time)
        records.append(record)
        append_record(out, record)

    log(0)
    tic = time.perf_counter()
    for step in range(1, config.steps + 1):
        x, y = data.batch("train", config.batch_size, gen)
        start = time.perf_counter()
        loss = lm_loss(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        try:
            if not math.isfinite(loss.item()):
                raise NonFiniteStepError(f"training loss {loss.item()}")
            optimizer.step()
        except NonFiniteStepError as err:
            diverged = dict(step=step, reason=" ".join(str(err).split())[:200])
            break
        step_time += time.perf_counter() - start
        train_losses.append(loss.item())
        if on_step is not None:
            on_step(step)
        if step % config.eval_every == 0 or step == config.steps:
            log(step)
    done = len(train_losses)
    vals = [r["val_loss"] for r in records if r["val_loss"] is not None]
    summary = dict(
        config=dataclasses.asdict(config),
        final_val_loss=records[-1]["val_loss"] if diverged is None else None,
        best_val_loss=min(vals) if vals else None,
        ms_per_step=1000 * step_time / max(done, 1),
        wall_time=time.perf_counter() - tic,
        steps_done=done,
        diverged=diverged,
    )
    write_json(out / "summary.json", summary)
    return summary
