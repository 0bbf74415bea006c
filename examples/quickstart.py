"""Quickstart: train a small Transformer on modular addition with QuotientAdam.

The lines between the ``imports`` and ``usage`` markers are the usage example on the
documentation's home page. Run ``python examples/quickstart.py``; a test calls ``run()`` with
few steps.
"""

from __future__ import annotations

import torch

# --8<-- [start:imports]
import quotopt
from quotopt.lab.tasks import get_task
from quotopt.models import Transformer

# --8<-- [end:imports]


def run(steps: int = 300, seed: int = 0) -> dict:
    """Train ``steps`` full-batch steps on (a + b) mod 23; return losses and accuracy."""
    torch.manual_seed(seed)
    # --8<-- [start:usage]
    task = get_task("modadd", p=23)  # (a + b) mod 23, 30% of the pairs for training
    model = Transformer(
        task.vocab_size, d_model=32, n_layers=1, n_heads=4, max_len=task.seq_len, activation="relu"
    )
    groups = quotopt.symmetries(model)  # param groups by symmetry: heads, ReLU units, the rest
    opt = quotopt.QuotientAdam(groups, lr=3e-3, betas=(0.9, 0.98), weight_decay=1.0)
    x, y = task.batch("train", None)  # the full training split
    for _ in range(steps):
        opt.zero_grad()
        loss = task.loss(task.logits(model, x), y)
        loss.backward()
        opt.step()
    # --8<-- [end:usage]
    return {
        "groups": [g["name"] for g in groups],
        "train_loss": loss.item(),
        "val_accuracy": task.evaluate(model, "val")["accuracy"],
    }


if __name__ == "__main__":
    torch.set_num_threads(1)  # models this small run fastest on one thread
    result = run()
    print("param groups:", ", ".join(result["groups"]))
    print(
        f"final train loss {result['train_loss']:.4f}, "
        f"validation accuracy {result['val_accuracy']:.3f}"
    )
