r"""Newton–Schulz orthogonalisation: of a matrix (``torch.optim.Muon``'s), and of each factor of
a bundle's tangent vector (QuotientMuon's direction, ``orthogonalise_factors``).

``newton_schulz`` is the quintic iteration of ``torch.optim.Muon`` (Keller Jordan's Muon,
coefficients (3.4445, −4.7750, 2.0315), five steps), batched over leading axes. On a 2-D
bfloat16 input it performs torch's operations in torch's order, so QuotientMuon's plain groups
reproduce ``torch.optim.Muon`` bit for bit; bundle groups run it in the parameters' precision
(float32 at least), batched over heads with ``baddbmm``. It is O(m)×O(n)-equivariant,
NS(Q X K) = Q NS(X) K for orthogonal Q, K (docs/theory/optimisers.md#quotientmuon).
"""

from __future__ import annotations

import math

import torch

from manifolds import Bundle

__all__ = [
    "NS_COEFFICIENTS",
    "NS_EPS",
    "NS_STEPS",
    "SCOPES",
    "adjust_lr",
    "factored_parts",
    "newton_schulz",
    "orthogonalise_factors",
]

#: torch.optim.Muon's defaults (Keller Jordan's Muon post)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_EPS = 1e-7
NS_STEPS = 5
#: what one orthogonalised matrix of a bundle group is: one head's factor (rows, r), or a
#: factor of all heads side by side (rows, H·r), the whole projection as a torch layer holds it
SCOPES = ("head", "tensor")

Tensors = tuple[torch.Tensor, ...]


def newton_schulz(
    x: torch.Tensor, coefficients, steps: int, eps: float, dtype=torch.bfloat16, row_sums=None
):
    """The approximate polar factor U S'Vᵀ (S' ≈ 1) of each matrix of ``x`` (..., m, n),
    computed in ``dtype`` and returned in it; zero singular values stay zero.

    ``row_sums``: for matrices whose rows are split across processes (batched input only), the
    bundle's ``row_sums``; the iteration then runs on the n×n Grams XᵀX, completed by it (one
    all-reduce of the squared norms and one per step)."""
    if steps >= 100:
        raise ValueError(f"ns_steps must be < 100, got {steps}")
    a, b, c = coefficients
    y = x.to(dtype)
    tall = x.size(-2) > x.size(-1) or row_sums is not None
    if tall:
        y = y.mT
    if y.dim() == 2:  # torch.optim.Muon's operations, in its order
        y = y / y.norm().clamp(min=eps)
        for _ in range(steps):
            gram = y @ y.T
            update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
            y = torch.addmm(y, update, y, beta=a)
    else:
        shape = y.shape
        y = y.reshape(-1, *shape[-2:])
        if row_sums is None:
            y = y / torch.linalg.matrix_norm(y, keepdim=True).clamp(min=eps)
        else:
            (size,) = row_sums(y.square().sum((-2, -1), keepdim=True))
            y = y / size.sqrt().clamp(min=eps)
        total = (lambda t: row_sums(t)[0]) if row_sums is not None else (lambda t: t)  # noqa: E731
        for _ in range(steps):
            gram = total(y @ y.mT)
            update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            y = torch.baddbmm(y, update, y, beta=a)
        y = y.reshape(shape)
    return y.mT if tall else y


def adjust_lr(lr: float, adjust_lr_fn: str | None, shape) -> float:
    """torch.optim.Muon's learning-rate adjustment for a matrix of ``shape`` (out, in)."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


def factored_parts(bundle: Bundle, v) -> list[tuple[Bundle, Tensors]]:
    """The factored bundles a group is made of, each with its part of ``v`` (a point or
    tangent): the bundle itself, or each component of a product (``components_of``: fused
    q/k/v, partial rotary, ``nn.MultiheadAttention``). ``NotImplementedError`` (the uniform
    error of ``Bundle.factors``) where one has no two factors per head."""
    components = getattr(bundle, "components", None)
    if components is None:
        bundle.factors(v)  # raises for bundles without factors
        return [(bundle, tuple(v))]
    parts = bundle.components_of(v)
    return [leaf for c, part in zip(components, parts) for leaf in factored_parts(c, part)]


def orthogonalise_factors(bundle: Bundle, v: Tensors, scope: str, adjust_lr_fn, **ns) -> Tensors:
    """Newton–Schulz on each factor of the tangent ``v`` (``bundle.factors``; a product's
    components one by one, ``factored_parts``), per head (``scope="head"``: (H, rows, r) as H
    matrices) or per tensor (``"tensor"``: the (rows, H·r) matrix of all heads side by side),
    in v's precision (float32 at least); each factor scaled by torch's ``adjust_lr_fn`` ratio
    for a (k, rows) weight, k = r or H·r (a factor's columns are the k-dimensional side, as
    in a query weight (H·r, d))."""
    dtype = torch.promote_types(v[0].dtype, torch.float32)
    out: list[torch.Tensor] = []
    for part_bundle, part in factored_parts(bundle, v):
        factors = []
        split = part_bundle.rows_split  # rows on several processes: Grams all-reduced
        for j, f in enumerate(part_bundle.factors(part)):  # (H, rows, r)
            h, rows, r = f.shape
            rows = part_bundle.factor_rows[j] if split else rows
            if scope == "head":
                sums = part_bundle.row_sums if split else None
                o, k = newton_schulz(f, dtype=dtype, row_sums=sums, **ns), r
            else:
                o = newton_schulz(f.transpose(0, 1).reshape(rows, h * r), dtype=dtype, **ns)
                o, k = o.reshape(rows, h, r).transpose(0, 1), h * r
            factors.append(o.to(f.dtype) * adjust_lr(1.0, adjust_lr_fn, (k, rows)))
        out.extend(part_bundle.from_factors(*factors))
    return tuple(out)
