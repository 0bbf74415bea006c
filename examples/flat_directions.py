"""Flat directions of small losses: how many the symmetries explain, and what the count means.

``quotopt.dynamics`` counts near-zero Hessian eigenvalues (|λ| ≤ ``rel_tol``·max|λ|) of the
total-space Hessian H and of its restriction QᵀHQ to a complement of the vertical tangents; at a
critical point the second count is the first minus the orbit dimension. Three cases:

1. **Two-factor matrix factorisation** ½‖A Bᵀ − M*‖² at a minimum (``HeadQK`` with one head):
   the r² GL(r) directions are exactly flat and nothing else is.
2. **The same with L2 weight decay** ½λ(‖A‖² + ‖B‖²) at its minimum (the balanced, shrunk
   factors): decay breaks GL(r) down to O(r), so only the compact part, r(r−1)/2 directions,
   stays flat.
3. **A tiny Transformer** on every input of ``modadd`` (p = 7), with the loss
   ½‖f(θ; x) − f(θ₀; x)‖²/N (a critical point at θ₀ for any θ₀, with Hessian JᵀJ/N). The head
   GL(r) groups, the ReLU-unit rescalings and the O(d) residual rotations explain 30 flat
   directions; the 9 left are symmetries nobody declared: shifting every token embedding by u
   and every position embedding by −u, shifting the ``=`` token's embedding against position 2's
   (the only place it occurs), both exact for this data, and one joint rescaling of the
   residual stream that the final RMSNorm undoes up to its ε.

The Transformer's parameters are drawn at std 1: at GPT-2's N(0, 0.02²) the attention is
nearly uniform, and curvature along W_q, W_k falls to ~1e-9 of the largest, below any useful
tolerance. Double backward through attention needs PyTorch's math SDPA kernel (the fused CPU
kernels have no second derivative), hence ``sdpa_kernel(SDPBackend.MATH)``.

Run ``python examples/flat_directions.py``.
"""

from __future__ import annotations

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import manifolds
import quotopt
from quotopt.dynamics import (
    analyse_flat_directions,
    dense_hessian,
    flat_directions,
    flatten,
    model_vertical_basis,  # what `quotopt spectrum` counts with
)
from quotopt.lab.tasks import get_task
from quotopt.models import Transformer

F64 = torch.float64


# ---- 1 and 2: matrix factorisation ---------------------------------------------------------
def factorisation(d: int, r: int, decay: float, gen: torch.Generator):
    """The loss and its minimiser: for M* = U S Vᵀ of rank r, A = U (S − λ)^½, B = V (S − λ)^½
    (then (ABᵀ − M*)B + λA = 0; with λ = 0 any factorisation of M* is a minimum)."""
    u, _ = torch.linalg.qr(torch.randn(d, r, dtype=F64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d, r, dtype=F64, generator=gen))
    s = torch.linspace(1.0, 3.0, r, dtype=F64)  # distinct singular values, all above λ
    target = (u * s) @ v.T
    root = (s - decay).sqrt()
    point = ((u * root).unsqueeze(0), (v * root).unsqueeze(0))  # (1, d, r) each: one "head"

    def loss(a, b):
        fit = 0.5 * ((a[0] @ b[0].T - target) ** 2).sum()
        return fit + 0.5 * decay * ((a**2).sum() + (b**2).sum())

    return loss, point


# ---- 3: a tiny Transformer -------------------------------------------------------------------
def vertical_columns(model, groups: list[dict]) -> torch.Tensor:
    """(n_params, Σ dim G): every bundle group's vertical tangents, written through its layout
    into the flattened coordinates of all the model's parameters (zero outside the group)."""
    return model_vertical_basis(model, groups)[0]


def undeclared_columns(params: dict, p: int, names: tuple[str, ...]) -> torch.Tensor:
    """The 9 directions of the module docstring: two embedding shifts (d each), one scaling."""
    tok = params["tok_emb"]
    columns = [flatten([params[n] if n in names else torch.zeros_like(params[n]) for n in params])]
    for i in range(tok.shape[1]):
        for rows_tok, rows_pos in ((slice(None), slice(None)), (p, 2)):  # all rows; '=' at pos 2
            shift = {n: torch.zeros_like(t) for n, t in params.items()}
            shift["tok_emb"][rows_tok, i], shift["pos_emb"][rows_pos, i] = 1.0, -1.0
            columns.append(flatten(list(shift.values())))
    return torch.stack(columns, dim=1)


def transformer_case(p: int, d_model: int, seed: int, rel_tol: float):
    torch.manual_seed(seed)
    task = get_task("modadd", p=p, seed=seed)
    x = torch.cat([task.batch("train", None)[0], task.batch("val", None)[0]])  # all p² inputs
    model = Transformer(
        task.vocab_size,
        d_model,
        n_layers=1,
        n_heads=2,
        max_len=task.seq_len,
        d_mlp=2 * d_model,
        activation="relu",
    ).double()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 1.0)
    params = {n: t.detach().clone() for n, t in model.named_parameters()}
    with torch.no_grad():
        reference = model(x)

    def loss(*values):
        with sdpa_kernel(SDPBackend.MATH):  # double-differentiable attention
            out = torch.func.functional_call(model, dict(zip(params, values)), (x,))
        return 0.5 * ((out - reference) ** 2).sum() / len(x)

    hessian = dense_hessian(loss, tuple(params.values()))
    heads_units = quotopt.symmetries(model)  # GL(r) per head, ReLU rescaling
    rotations = quotopt.symmetries(model, heads=False, residual=True, rescaling=False)  # O(d)
    sym = vertical_columns(model, heads_units + rotations)
    scaled = ("tok_emb", "pos_emb", "blocks.0.attn.wo", "blocks.0.mlp.w_out")
    rows = {
        "heads GL(r) + ReLU units": vertical_columns(model, heads_units),
        "O(d) residual rotations": vertical_columns(model, rotations),
        "all three": sym,
        "+ 9 undeclared directions": torch.cat([sym, undeclared_columns(params, p, scaled)], 1),
    }
    return {label: flat_directions(hessian, v, rel_tol=rel_tol) for label, v in rows.items()}


# ---- the run ---------------------------------------------------------------------------------
def _print(title: str, reports: dict) -> None:
    print(f"\n{title}")
    print(f"  {'':<30} {'params':>6} {'orbit dim':>9} {'flat total':>10} {'flat horiz.':>11}")
    for label, r in reports.items():
        print(
            f"  {label:<30} {r.n_params:>6} {r.orbit_dim:>9} {r.flat_total:>10} "
            f"{r.flat_horizontal:>11}"
        )


def run(
    d: int = 6,
    r: int = 3,
    decay: float = 0.1,
    p: int = 7,
    d_model: int = 4,
    seed: int = 0,
    rel_tol: float = 1e-8,
) -> dict:
    """Compute and print the three cases; return their ``FlatReport``s."""
    gen = torch.Generator().manual_seed(seed)
    bundle = manifolds.HeadQK(1, d, r)
    factor = {}
    for label, lam in (("at a minimum", 0.0), (f"with L2 decay {decay:g}", decay)):
        loss, point = factorisation(d, r, lam, gen)
        factor[label] = analyse_flat_directions(loss, bundle, point, rel_tol)
    _print(
        f"½‖A Bᵀ − M*‖², d={d}, r={r}: dim GL(r) = {r * r}, dim O(r) = {r * (r - 1) // 2}", factor
    )
    model = transformer_case(p, d_model, seed, rel_tol)
    _print(f"Transformer on modadd p={p}, d={d_model}, function-matching loss at θ₀", model)
    print(f"\ntolerance for the Transformer: {next(iter(model.values())).tolerance_rule}")
    return {"factorisation": factor, "transformer": model}


if __name__ == "__main__":
    torch.set_num_threads(1)  # models this small run fastest on one thread
    run()
