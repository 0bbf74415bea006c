"""Random samples for tests and examples, reproducible across devices and dtypes."""

from __future__ import annotations

import torch

__all__ = ["randn", "random_orthogonal"]


def randn(shape, generator=None, dtype=None, device=None) -> torch.Tensor:
    """Standard normal samples drawn in float64 on the generator's device, then cast and moved:
    the same generator gives the same numbers on every device and dtype."""
    gen_device = generator.device if generator is not None else "cpu"
    sample = torch.randn(tuple(shape), generator=generator, dtype=torch.float64, device=gen_device)
    return sample.to(dtype=dtype or torch.get_default_dtype(), device=device or "cpu")


def random_orthogonal(batch: tuple[int, ...], n: int, generator=None, dtype=None, device=None):
    """Haar-distributed orthogonal n x n matrices (QR of a Gaussian with the sign fix)."""
    q, r = torch.linalg.qr(randn((*batch, n, n), generator, torch.float64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    return q.to(dtype=dtype or torch.get_default_dtype(), device=device or "cpu")
