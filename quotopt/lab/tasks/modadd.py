"""Modular addition, the grokking benchmark of Nanda et al. (2023).

Neel Nanda, Lawrence Chan, Tom Lieberum, Jess Smith, Jacob Steinhardt, "Progress measures for
grokking via mechanistic interpretability", ICLR 2023 (arXiv:2301.05217).

Every pair ``(a, b)`` with ``0 <= a, b < p`` is one example: the input is the three tokens
``[a, b, =]`` (token ``p`` is ``=``, so ``vocab_size = p + 1``) and the answer is ``(a + b) mod p``,
read from the last position. A fraction ``frac_train`` (0.3 in the paper) of the ``p**2`` pairs,
chosen by ``seed``, is the training set; all the others are the validation set. The paper trains
full batch (``batch("train", None)``) and reports when validation accuracy reaches 99%.

Shapes: ``x`` is ``(B, 3)`` long; ``y`` is ``(B,)`` long, the answer for the last position only
(``readout_last``). ``loss`` accepts logits ``(B, 3, V)``, ``(B, 1, V)`` or ``(B, V)`` and scores
the last position; ``V`` may be ``p + 1`` (the whole vocabulary, never predicting ``=``) or ``p``
(the paper's unembedding, ``d_vocab_out = p``).
"""

from __future__ import annotations

import torch

from quotopt.lab.tasks.base import TensorTask, stable_order


class ModAdd(TensorTask):
    """``(a + b) mod p`` on inputs ``[a, b, =]``; see the module docstring."""

    name = "modadd"
    kind = "lm"
    seq_len = 3
    readout_last = True
    target = ("accuracy", 0.99)

    def __init__(self, seed: int = 0, p: int = 113, frac_train: float = 0.3):
        if p < 2:
            raise ValueError(f"p must be an integer >= 2, got {p}")
        if not 0.0 < frac_train < 1.0:
            raise ValueError(f"frac_train must lie strictly between 0 and 1, got {frac_train}")
        self.p, self.frac_train = int(p), float(frac_train)
        self.vocab_size = self.p + 1
        order = stable_order(self.p**2, seed, "modadd")
        a, b = order // self.p, order % self.p
        x = torch.stack([a, b, torch.full_like(a, self.p)], dim=1)  # (p², 3)
        y = (a + b) % self.p  # (p²,)
        cut = int(self.frac_train * self.p**2)  # as in the paper: int(frac_train * len(pairs))
        super().__init__(seed, {"train": (x[:cut], y[:cut]), "val": (x[cut:], y[cut:])})
