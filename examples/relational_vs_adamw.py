"""QuotientAdam against AdamW on the relational transformer, on minGPT's sorting task.

``quotopt.models.RelationalTransformer`` carries k channel vectors per token in a gauge space
R^D; every weight mixes channels only, so O(D) acts on the embedding tables alone, and the
attention heads carry their GL(r) symmetries in channel space. ``quotopt.symmetries`` finds both:
the ``gauge`` group (O(D) on ``tok_emb``) and one ``HeadQK``/``HeadOV`` pair per block.

Both optimisers start from the same initialisation, see the same batches and use the same
learning rate; weight decay 0.1 for AdamW and for QuotientAdam's decay on the invariants (which is
not the same strength: see the "Compare optimisers" guide before reading anything into a gap).
One seed and a few hundred steps make a demonstration, not a benchmark: the protocol in
``benchmarks/`` runs several seeds with tuned hyperparameters.

Run ``python examples/relational_vs_adamw.py``.
"""

from __future__ import annotations

import copy

import torch

import quotopt
from quotopt.lab.tasks import get_task
from quotopt.models import RelationalTransformer


def _train(model, optimizer, task, steps: int, batch_size: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)  # the same batches for every optimiser
    losses = []
    for _ in range(steps):
        x, y = task.batch("train", batch_size, generator=gen)
        optimizer.zero_grad()
        loss = task.loss(task.logits(model, x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def run(
    steps: int = 500,
    n_channels: int = 16,
    d_gauge: int = 4,
    n_layers: int = 2,
    batch_size: int = 64,
    lr: float = 3e-3,
    weight_decay: float = 0.1,
    metric: str = "invariant",
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Train one model per optimiser; return final train/validation metrics per optimiser."""
    torch.manual_seed(seed)
    task = get_task("sort", seed=seed)  # 6 digits of 3 symbols, 25% of the sequences held out
    init = RelationalTransformer(
        task.vocab_size, n_channels, d_gauge, n_layers, n_heads=2, max_len=task.seq_len
    )
    betas = (0.9, 0.95)  # minGPT's
    results = {}
    for name in ("AdamW", "QuotientAdam"):
        model = copy.deepcopy(init)
        if name == "AdamW":
            opt = torch.optim.AdamW(model.parameters(), lr, betas, weight_decay=weight_decay)
        else:
            groups = quotopt.symmetries(model, metric=metric)
            opt = quotopt.QuotientAdam(groups, lr, betas, weight_decay=weight_decay)
        losses = _train(model, opt, task, steps, batch_size, seed)
        val = task.evaluate(model, "val")
        results[name] = {
            "train_loss": sum(losses[-20:]) / len(losses[-20:]),  # mean of the last 20 steps
            "val_loss": val["loss"],
            "val_accuracy": val["accuracy"],
            "val_exact_match": val["exact_match"],
        }
    n_params = sum(p.numel() for p in init.parameters())
    print(
        f"sort, RelationalTransformer k={n_channels} D={d_gauge} layers={n_layers} "
        f"({n_params} parameters), {steps} steps, lr {lr}, wd {weight_decay}"
    )
    print(f"  {'optimiser':<13} {'train loss':>10} {'val loss':>9} {'val acc':>8} {'exact':>6}")
    for name, r in results.items():
        print(
            f"  {name:<13} {r['train_loss']:>10.4f} {r['val_loss']:>9.4f} "
            f"{r['val_accuracy']:>8.3f} {r['val_exact_match']:>6.3f}"
        )
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)  # models this small run fastest on one thread
    run()
