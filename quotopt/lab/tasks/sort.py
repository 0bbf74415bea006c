"""Sorting short sequences, the first demo of Andrej Karpathy's minGPT.

minGPT's ``demo.ipynb``, ``SortDataset`` (https://github.com/karpathy/minGPT, MIT licence): a
sequence of ``length`` digits from ``num_digits`` symbols (6 and 3 by default) is followed by the
same digits sorted; the model reads ``concat(digits, sorted)[:-1]`` and predicts
``concat(digits, sorted)[1:]``, scored only where the sorted half is predicted (the first
``length - 1`` targets are ``-1``).

All ``num_digits ** length`` sequences (729 by default) are enumerated; a fraction ``val_fraction``
(0.25, as minGPT's ``hash % 4 == 0`` rule) chosen by ``seed`` is held out, so train and validation
sequences are disjoint. minGPT samples training sequences uniformly, as ``batch`` does (its
rejection of sequences with more than ``length // 2`` distinct digits can never fire at 3 symbols).

``evaluate`` reports teacher-forced ``loss`` and per-token ``accuracy`` over the sorted half, and
``exact_match``: the fraction of sequences whose sorted half, generated autoregressively with greedy
decoding from the unsorted digits alone (minGPT's ``generate(..., do_sample=False)``), is entirely
right. ``target`` is ``("exact_match", 1.0)``.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from quotopt.lab.tasks.base import TensorTask, model_device, spread, stable_order


class Sort(TensorTask):
    """minGPT's sorting task; see the module docstring."""

    name = "sort"
    kind = "lm"
    target = ("exact_match", 1.0)

    def __init__(
        self, seed: int = 0, length: int = 6, num_digits: int = 3, val_fraction: float = 0.25
    ):
        if length < 2 or num_digits < 2:
            raise ValueError(f"need length >= 2 and num_digits >= 2, got {length}, {num_digits}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
        self.length, self.num_digits = int(length), int(num_digits)
        self.vocab_size, self.seq_len = self.num_digits, 2 * self.length - 1
        digits = torch.tensor(list(itertools.product(range(num_digits), repeat=length)))  # (N, n)
        digits = digits[stable_order(len(digits), seed, "sort")]
        full = torch.cat([digits, digits.sort(dim=1).values], dim=1)  # (N, 2n)
        x, y = full[:, :-1], full[:, 1:].clone()  # (N, 2n-1) each
        y[:, : self.length - 1] = -1
        cut = round(val_fraction * len(digits))  # the first `cut` sequences are held out
        super().__init__(seed, {"train": (x[cut:], y[cut:]), "val": (x[:cut], y[:cut])})

    @torch.no_grad()
    def exact_match(
        self,
        model: nn.Module,
        split: str = "val",
        batch_size: int = 1024,
        device=None,
        max_examples: int | None = None,
    ) -> float:
        """Fraction of sequences whose greedily generated sorted half is entirely correct."""
        self.check_split(split)
        device = model_device(model) if device is None else torch.device(device)
        x, _ = self.data[split]
        x = x[spread(len(x), max_examples)]
        was_training = model.training
        model.eval()
        try:
            right = sum(self.generate_correct(model, xb.to(device)) for xb in x.split(batch_size))
        finally:
            model.train(was_training)
        return right / len(x)

    def generate_correct(self, model: nn.Module, x: Tensor) -> int:
        """How many rows of ``x`` (B, 2n-1) the model sorts correctly from their first n tokens."""
        seq = x[:, : self.length]  # (B, n)
        for _ in range(self.length):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            seq = torch.cat([seq, nxt], dim=1)
        want = x[:, : self.length].sort(dim=1).values  # (B, n)
        return int((seq[:, self.length :] == want).all(dim=1).sum())

    def evaluate(self, model, split="val", batch_size=1024, device=None, max_examples=None):
        """Teacher-forced ``loss`` and ``accuracy``, plus greedy autoregressive ``exact_match``."""
        metrics = super().evaluate(model, split, batch_size, device, max_examples)
        metrics["exact_match"] = self.exact_match(model, split, batch_size, device, max_examples)
        return metrics
