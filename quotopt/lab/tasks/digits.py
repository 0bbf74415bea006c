"""Handwritten digits as sequences of patch tokens: a small offline vision benchmark.

The images are scikit-learn's ``load_digits`` (shipped with scikit-learn, no download): 1,797 8x8
images with pixels 0..16, from the UCI "Optical Recognition of Handwritten Digits" data set
(E. Alpaydin and C. Kaynak, 1998). Each image becomes 16 tokens, one per 2x2 patch in raster order
(a ViT-style patching). Each of a patch's four pixels is quantised to four levels,
``level = min(4 * v // 17, 3)`` (0-4, 5-8, 9-12, 13-16), and the token is the base-4 number
``64 * top_left + 16 * top_right + 4 * bottom_left + bottom_right``, so ``vocab_size = 256``.

``kind = "classify"`` with ``n_classes = 10``; ``y`` has shape ``(B,)`` and the class is read from
the last position (``readout_last``), so ``loss`` accepts logits ``(B, 16, 10)``, ``(B, 1, 10)`` or
``(B, 10)``. The split is stratified: within each digit a fraction ``val_fraction`` (0.2) chosen by
``seed`` is held out. ``target`` is ``("accuracy", 0.9)``, reachable but not trivial: a 2-layer,
64-wide causal transformer (AdamW, lr 1e-3, weight decay 1.0, batch 64) passed 0.90 near step
3,000 and peaked near 0.93; logistic regression on the one-hot tokens gets 0.93-0.94, an RBF SVM
on the quantised pixels 0.97-1.0.
"""

from __future__ import annotations

import functools

import torch

from quotopt.lab.tasks.base import DATA_EXTRA, TensorTask, stable_order


@functools.lru_cache(maxsize=1)
def load_images() -> tuple[torch.Tensor, torch.Tensor]:
    """The digit images (N, 8, 8) long and labels (N,) long, from scikit-learn (read once)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError(f"the 'digits' task reads scikit-learn's digits: {DATA_EXTRA}") from err
    bunch = load_digits()
    return torch.as_tensor(bunch.images).round().long(), torch.as_tensor(bunch.target).long()


def patch_tokens(images: torch.Tensor) -> torch.Tensor:
    """Images (N, 8, 8) with pixels 0..16 to tokens (N, 16) in [0, 256), one per 2x2 patch."""
    levels = (4 * images // 17).clamp(max=3)  # (N, 8, 8) in 0..3
    patches = levels.unflatten(1, (4, 2)).unflatten(3, (4, 2))  # (N, 4, 2, 4, 2): row, dy, col, dx
    patches = patches.permute(0, 1, 3, 2, 4).flatten(3)  # (N, 4, 4, 4): row, col, (dy, dx)
    weights = torch.tensor([64, 16, 4, 1])
    return (patches * weights).sum(-1).flatten(1)  # (N, 16)


class Digits(TensorTask):
    """8x8 digits as 16 patch tokens; see the module docstring."""

    name = "digits"
    kind = "classify"
    vocab_size = 256
    seq_len = 16
    n_classes = 10
    readout_last = True
    target = ("accuracy", 0.9)

    def __init__(self, seed: int = 0, val_fraction: float = 0.2):
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
        images, labels = load_images()
        val = torch.zeros(len(labels), dtype=torch.bool)
        for c in range(self.n_classes):
            members = (labels == c).nonzero().squeeze(1)
            held = members[stable_order(len(members), seed, f"digits:{c}")]
            val[held[: round(val_fraction * len(members))]] = True
        x = patch_tokens(images)
        self.indices = {"train": (~val).nonzero().squeeze(1), "val": val.nonzero().squeeze(1)}
        data = {split: (x[i], labels[i]) for split, i in self.indices.items()}
        super().__init__(seed, data)
