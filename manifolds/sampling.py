"""Random samples for tests and examples, reproducible across devices and dtypes."""

from __future__ import annotations

import math

import torch

__all__ = ["randn", "random_orthogonal", "log_spaced", "dtype_device"]


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


def dtype_device(dtype, device) -> tuple[torch.dtype, torch.device]:
    """The requested dtype and device, or torch's default dtype and the CPU."""
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.device("cpu")
    return dtype, device


def log_spaced(batch, n: int, condition: float, generator, dtype, device) -> torch.Tensor:
    """(*batch, n) positive values with max/min = condition along the last axis (the two
    extremes always drawn, the others log-uniform between them)."""
    gen_device = generator.device if generator is not None else "cpu"
    t = torch.rand((*batch, n), generator=generator, dtype=torch.float64, device=gen_device)
    t[..., 0] = 0.0
    if n > 1:
        t[..., 1] = 1.0
    return torch.exp(t * math.log(condition)).to(dtype=dtype, device=device)
