r"""Fake quantisers: round-to-nearest in the working precision, with a straight-through gradient.

* weights ``quantise_weight(w, bits, group)``: symmetric RTN of an ``(out, in)`` matrix, one
  scale per output channel (``group=None``) or per ``group`` consecutive inputs of a channel,
  scale = max|w| / (2^{b−1} − 1);
* activations ``quantise_tokens(x, bits, clip)``: symmetric RTN per token (the last axis), scale
  = clip · max|x| / (2^{b−1} − 1), as QuaRot quantises the inputs of its linear layers;
* keys and values ``quantise_asymmetric(x, bits)``: asymmetric RTN per token and head (the last
  axis), scale = (max − min) / (2^b − 1), as QuaRot quantises its cache.

All return ``x + (q − x).detach()``: the forward value is the quantised one and the backward pass
is the identity (the straight-through estimator of Bengio et al. 2013, as SpinQuant trains).
``QuantSpec`` holds one configuration and parses names like ``"W4A4KV4"`` or ``"W4g32A8"``.
"""

from __future__ import annotations

import dataclasses
import re

import torch

__all__ = ["QuantSpec", "quantise_weight", "quantise_tokens", "quantise_asymmetric"]

_SPEC = re.compile(r"^W(\d+)(?:g(\d+))?(?:A(\d+))?(?:KV(\d+))?$")


def _check_bits(bits, name: str) -> None:
    if bits is not None and (not isinstance(bits, int) or not 2 <= bits <= 16):
        raise ValueError(
            f"{name} must be an integer from 2 to 16 or None (no quantisation), got {bits!r}"
        )


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return x + (q - x).detach()


def quantise_weight(
    w: torch.Tensor, bits: int | None, group: int | None = None, straight_through: bool = True
) -> torch.Tensor:
    """Symmetric RTN of ``w`` (out, in): per output channel, or per ``group`` inputs.

    ``straight_through=False``: the rounding has zero derivative and the scale its own, so that
    the gradient of the rounding error ‖Q(w) − w‖² is that of the error (not zero, as it would
    be through the straight-through estimator)."""
    if bits is None or bits >= 16:
        return w
    if group is not None and w.shape[-1] % group:
        raise ValueError(
            f"group={group} must divide the input width {w.shape[-1]}; pick a "
            "divisor or group=None (per channel)"
        )
    blocks = w if group is None else w.unflatten(-1, (-1, group))
    top = 2 ** (bits - 1) - 1
    if straight_through:
        blocks = blocks.detach()
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-30) / top
    q = (blocks / scale).detach().round().clamp(-top - 1, top) * scale
    q = q if group is None else q.flatten(-2)
    return _straight_through(w, q) if straight_through else q


def quantise_tokens(x: torch.Tensor, bits: int | None, clip: float = 1.0) -> torch.Tensor:
    """Symmetric per-token RTN of ``x`` (…, features), range ``clip`` · max|x|."""
    if bits is None or bits >= 16:
        return x
    top = 2 ** (bits - 1) - 1
    scale = clip * x.detach().abs().amax(-1, keepdim=True).clamp_min(1e-30) / top
    q = (x / scale).round().clamp(-top - 1, top) * scale
    return _straight_through(x, q)


def quantise_asymmetric(x: torch.Tensor, bits: int | None) -> torch.Tensor:
    """Asymmetric per-row RTN of ``x`` (…, features): min and max of each row map to 0, 2^b − 1."""
    if bits is None or bits >= 16:
        return x
    low = x.detach().amin(-1, keepdim=True)
    scale = (x.detach().amax(-1, keepdim=True) - low).clamp_min(1e-30) / (2**bits - 1)
    q = ((x - low) / scale).round().clamp(0, 2**bits - 1) * scale + low
    return _straight_through(x, q)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Which tensors are fake-quantised, and how (``None``: kept in full precision)."""

    w_bits: int | None = 4  # weights of every linear map inside the blocks (RTN)
    w_group: int | None = None  # inputs per weight scale; None: one scale per output channel
    a_bits: int | None = 4  # inputs of those linear maps, per token
    kv_bits: int | None = None  # keys (after RoPE) and values, per token and head
    a_clip: float = 1.0  # fraction of each token's max|x| the activation range covers

    def __post_init__(self):
        for name in ("w_bits", "a_bits", "kv_bits"):
            _check_bits(getattr(self, name), name)
        if self.w_group is not None and (not isinstance(self.w_group, int) or self.w_group < 1):
            raise ValueError(f"w_group must be a positive integer or None, got {self.w_group!r}")
        if not 0 < self.a_clip <= 1:
            raise ValueError(f"a_clip must be in (0, 1], got {self.a_clip!r}")

    @classmethod
    def parse(cls, name: str) -> QuantSpec:
        """``"W4A4KV4"``, ``"W4A8"``, ``"W8"``, ``"W4g32A4"`` (g: weight group size); a width of
        16 means full precision."""
        match = _SPEC.match(name.strip())
        if match is None:
            raise ValueError(
                f"bits={name!r}: expected W<b>[g<group>][A<b>][KV<b>], for example "
                "W4A4KV4, W4A8 or W4g32A4"
            )
        w, g, a, kv = (int(v) if v else None for v in match.groups())
        for bits, part in ((w, "W"), (a, "A"), (kv, "KV")):
            _check_bits(bits, f"bits={name!r}: the {part} width")
        full = lambda b: None if b is None or b >= 16 else b  # noqa: E731
        return cls(w_bits=full(w), w_group=g, a_bits=full(a), kv_bits=full(kv))

    @property
    def name(self) -> str:
        parts = [f"W{self.w_bits or 16}" + (f"g{self.w_group}" if self.w_group else "")]
        parts.append(f"A{self.a_bits or 16}")
        if self.kv_bits:
            parts.append(f"KV{self.kv_bits}")
        return "".join(parts)

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return quantise_weight(w, self.w_bits, self.w_group)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        return quantise_tokens(x, self.a_bits, self.a_clip)

    def cache(self, x: torch.Tensor) -> torch.Tensor:
        return quantise_asymmetric(x, self.kv_bits)
