"""The flat-direction experiment: train the small modadd model to a near-critical point of
f + (λ/2)‖θ‖² and count the Hessian's flat directions against the orbit dimensions.

Training is full batch in float64: Adam with *coupled* L2 decay (its fixed points are the
critical points of the regularised objective, unlike decoupled AdamW's) and a cosine schedule to
zero. The ReLU model's objective is not smooth where a unit's pre-activation crosses zero, so the
gradient norm at the end is small but not zero (reported as ``grad_norm``).
See ``quotopt.dynamics.model_flat`` for which orbits stay flat."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import training
from ..dynamics import model_flat_directions


def flat_job(size: str, steps: int, lr: float, weight_decay: float, seed: int, directory: str):
    """The report of ``model_flat_directions`` (plus training settings), cached as JSON."""
    path = Path(directory) / "flat.json"
    if path.is_file():
        return json.loads(path.read_text())
    try:
        report = _train_and_analyse(size, steps, lr, weight_decay, seed)
    except Exception as err:  # noqa: BLE001 - reported on the page, not fatal to the study
        return dict(error=f"{type(err).__name__}: {' '.join(str(err).split())}")
    training.prepare_out(directory)
    training.write_json(path, report)
    return report


def _train_and_analyse(size, steps, lr, weight_decay, seed) -> dict:
    torch.manual_seed(seed)
    task = training.build_task("modadd", size, seed)
    model = training.build_model(task, "transformer", size).double()
    x, y = task.batch("train", None)
    params = [p for p in model.parameters() if p.requires_grad]

    def objective():
        penalty = sum(p.square().sum() for p in params)
        return task.loss(task.logits(model, x), y) + 0.5 * weight_decay * penalty

    adam = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.98))
    # annealing the step to zero lets Adam settle instead of hovering at a distance ∝ lr
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(adam, steps)
    for _ in range(steps):
        adam.zero_grad(set_to_none=True)
        objective().backward()
        adam.step()
        schedule.step()
    accuracy = task.evaluate(model, "val")["accuracy"]
    report = model_flat_directions(task, model, weight_decay=weight_decay)
    settings = dict(size=size, adam_steps=steps, lr=lr, seed=seed, val_accuracy=accuracy)
    return dict(settings, **report)
