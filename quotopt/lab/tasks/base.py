"""The task interface shared by every benchmark, and the helpers the tasks build on.

A task holds its splits in memory as integer tensors and answers five questions: what a batch
looks like (``batch``), how it is scored (``loss``, ``evaluate``), how large the splits are
(``split_sizes``) and when training counts as done (``target``).

Conventions
-----------
* Inputs ``x`` are token ids, ``torch.long``, shape ``(B, seq_len)``, values in
  ``[0, vocab_size)``.
* ``kind == "lm"``: targets are next tokens, shape ``(B, T)``, with ``-1`` on positions that are
  not scored. When ``readout_last`` is true only the last position is scored and the target is
  one token per sequence, shape ``(B,)``.
* ``kind == "classify"``: targets are class ids, shape ``(B,)``; the class is read from the last
  position (``readout_last`` is true), so a causal model sees the whole input there.
* Splits are deterministic functions of ``seed`` built from :func:`stable_order`, which depends on
  no random-number library and so gives the same split on any machine and any version.
* Batches are drawn with replacement (as nanoGPT's ``get_batch`` and minGPT's
  ``RandomSampler(replacement=True)`` do) from a CPU ``torch.Generator`` that the caller owns;
  the global RNG is never touched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPLITS = ("train", "val")
DATA_EXTRA = "pip install 'quotopt[data]'"


def stable_order(n: int, seed: int, salt: str) -> Tensor:
    """A permutation of ``range(n)`` that depends only on ``(n, seed, salt)``.

    Items are sorted by the BLAKE2b digest of ``"salt:seed:i"``, so the order is the same on every
    machine, platform and library version (unlike ``torch.randperm``, whose stream may change).
    """
    digests = [
        hashlib.blake2b(f"{salt}:{seed}:{i}".encode(), digest_size=8).digest() for i in range(n)
    ]
    return torch.tensor(sorted(range(n), key=digests.__getitem__), dtype=torch.long)


def spread(n: int, m: int | None) -> Tensor:
    """``m`` indices spread evenly over ``range(n)``; all of them when ``m`` is None or ``>= n``."""
    if m is None or m >= n:
        return torch.arange(n)
    if m < 1:
        raise ValueError(f"max_examples must be a positive integer or None, got {m}")
    return torch.linspace(0, n - 1, m).round().long()


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model that has none)."""
    for t in [*model.parameters(), *model.buffers()]:
        return t.device
    return torch.device("cpu")


class Task:
    """Base class: the scoring logic common to all tasks.

    Subclasses set the attributes below and implement :meth:`batch`, :attr:`split_sizes` and
    :meth:`eval_batches`.
    """

    name: str
    vocab_size: int
    seq_len: int
    kind: str  # "lm" or "classify"
    n_classes: int | None = None
    target: tuple[str, float | None] | None = None
    readout_last: bool = False

    def __init__(self, seed: int = 0):
        self.seed = int(seed)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, seed={self.seed}, kind={self.kind!r}, "
            f"vocab_size={self.vocab_size}, seq_len={self.seq_len}, split_sizes={self.split_sizes})"
        )

    # -- data -------------------------------------------------------------------------------

    @property
    def split_sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def batch(
        self,
        split: str,
        batch_size: int | None,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        """``batch_size`` examples drawn with replacement, or the full split for ``None``."""
        raise NotImplementedError

    def eval_batches(
        self, split: str, batch_size: int, max_examples: int | None = None
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """The split (or ``max_examples`` evenly spread examples of it) in fixed order, on CPU."""
        raise NotImplementedError

    def check_split(self, split: str) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")

    @staticmethod
    def draw(n: int, batch_size: int, generator: torch.Generator | None) -> Tensor:
        """``batch_size`` indices in ``[0, n)``, with replacement, from the caller's generator."""
        if generator is None:
            raise ValueError(
                "batch() needs a torch.Generator to draw a batch (tasks never use the global RNG); "
                "pass batch_size=None for the full split"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer or None, got {batch_size}")
        return torch.randint(n, (batch_size,), generator=generator)

    # -- scoring ----------------------------------------------------------------------------

    def readout(self, logits: Tensor) -> Tensor:
        """The scored logits: the last position when ``readout_last``, else all positions."""
        if self.readout_last and logits.dim() == 3:
            return logits[:, -1]  # (B, V)
        return logits

    def scores(self, logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Summed cross-entropy, number correct and number scored (``y == -1`` is not scored)."""
        logits = self.readout(logits)
        if logits.shape[:-1] != y.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} after readout do not fit targets {tuple(y.shape)}"
            )
        work = torch.promote_types(logits.dtype, torch.float32)  # bf16 up, float64 kept
        flat, y = logits.reshape(-1, logits.shape[-1]).to(work), y.reshape(-1)
        total = F.cross_entropy(flat, y, ignore_index=-1, reduction="sum")
        scored = y != -1
        correct = ((flat.argmax(-1) == y) & scored).sum()
        return total, correct, scored.sum()

    def loss(self, logits: Tensor, y: Tensor) -> Tensor:
        """Mean cross-entropy over the scored positions (a scalar, differentiable)."""
        total, _, count = self.scores(logits, y)
        return total / count.clamp(min=1)

    def logits(self, model: nn.Module, x: Tensor) -> Tensor:
        """``model(x)``, asking for the last position only when that is all that is scored."""
        return model(x, last_only=True) if self.readout_last else model(x)

    @torch.no_grad()
    def evaluate(
        self,
        model: nn.Module,
        split: str = "val",
        batch_size: int = 1024,
        device: torch.device | str | None = None,
        max_examples: int | None = None,
    ) -> dict[str, float]:
        """Mean loss and accuracy over the scored positions of ``split``.

        The model is put in eval mode and restored afterwards; ``device`` defaults to the model's.
        ``max_examples`` scores that many evenly spread examples instead of the whole split.
        """
        self.check_split(split)
        device = model_device(model) if device is None else torch.device(device)
        was_training = model.training
        model.eval()
        try:
            total = correct = count = 0.0
            for x, y in self.eval_batches(split, batch_size, max_examples):
                x, y = x.to(device), y.to(device)
                t, c, n = self.scores(self.logits(model, x), y)
                total, correct, count = total + t.item(), correct + c.item(), count + n.item()
        finally:
            model.train(was_training)
        return {"loss": total / max(count, 1.0), "accuracy": correct / max(count, 1.0)}


class TensorTask(Task):
    """A task whose splits are fixed tensors ``x`` (N, T) and ``y`` (N,) or (N, T)."""

    def __init__(self, seed: int, data: dict[str, tuple[Tensor, Tensor]]):
        super().__init__(seed)
        self.data = data

    @property
    def split_sizes(self) -> dict[str, int]:
        return {split: len(x) for split, (x, _) in self.data.items()}

    def batch(self, split, batch_size, generator=None, device=None):
        self.check_split(split)
        x, y = self.data[split]
        if batch_size is None:  # copies, so that callers cannot edit the stored split in place
            return x.to(device, copy=True), y.to(device, copy=True)
        i = self.draw(len(x), batch_size, generator)
        return x[i].to(device), y[i].to(device)

    def eval_batches(self, split, batch_size, max_examples=None):
        x, y = self.data[split]
        i = spread(len(x), max_examples)
        for j in i.split(batch_size):
            yield x[j], y[j]
