r"""The fibre of a gain-folded LLaMA: the group elements that leave its function unchanged.

With every RMSNorm gain folded into the maps that read the norm, a LLaMA-family model computes
the same function at every point of the orbit of (docs/theory/joint.md, docs/theory/bundles.md)

* ``residual``  R ∈ O(d) on the model axis of every tensor (``manifolds.ResidualRotation``);
* ``ov``        g ∈ GL(r) per key/value head and block on (W_v, W_o) (``manifolds.HeadOV``; with
  grouped-query attention the query heads of one key/value head stack their output blocks);
* ``qk``        one nonzero complex scalar per RoPE plane, per key/value head and block, on
  (W_q, W_k) — the commutant of the rotations (``manifolds.RotaryQK``, pairing "half");
* ``units``     s ≠ 0 per unit of each gated MLP on (up row, down column): a GL(1) per unit,
  written as ``manifolds.HeadOV`` with d_head = 1 (the gate's activation sees no change).

``Fibre(weights)`` builds the bundles once; ``act(weights, elements)`` applies a dict of elements
(``identity`` gives the neutral one; absent keys act trivially) through the bundles' own
``act``, batched over nothing but its heads, so that autograd reaches the elements. Every move
is exact; ``exact(elements)`` projects the residual element onto O(d) in float64 (by its polar
factor) before the representative is written, since an element learned in float32 is
orthogonal only to ≈1e-6.
"""

from __future__ import annotations

import torch

import manifolds as M

from .model import LINEARS, READS, LlamaWeights

__all__ = ["Fibre", "PARTS", "hadamard", "random_hadamard"]

PARTS = ("residual", "ov", "qk", "units")


def hadamard(n: int, *, dtype=torch.float64, device=None) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two), scaled to be orthogonal."""
    if n < 1 or n & (n - 1):
        raise ValueError(
            f"n={n}: Sylvester's construction needs a power of two; QuaRot's "
            "rotation is defined here for powers of two only"
        )
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return h / n**0.5


def random_hadamard(n: int, generator=None, *, dtype=torch.float64, device=None):
    """QuaRot's randomised Hadamard rotation diag(±1) · H (H from ``hadamard``)."""
    signs = torch.randint(0, 2, (n,), generator=generator).to(dtype=dtype, device=device) * 2 - 1
    return signs[:, None] * hadamard(n, dtype=dtype, device=device)


class Fibre:
    """The symmetry group of ``weights``'s architecture (module docstring)."""

    def __init__(self, weights: LlamaWeights):
        w = weights
        d, r, n_kv = w.d_model, w.d_head, w.n_kv
        self.n_layers, self.d_model, self.d_head, self.n_kv = len(w.blocks), d, r, n_kv
        self.n_rep = w.n_heads // n_kv
        self.n_units = w.blocks[0]["up"].shape[0]
        axes = [1] + [1 if n in READS else 0 for _ in w.blocks for n in LINEARS] + [1]
        self.residual = M.ResidualRotation(d, axes)
        self.ov = M.HeadOV(n_kv, d, r, factor_rows=(d, self.n_rep * d))
        self.qk = M.RotaryQK(n_kv, d, r, pairing="half", factor_rows=(self.n_rep * d, d))
        self.units = M.HeadOV(self.n_units, d, 1)

    # ---- the layouts: projection weights (out, in) as the bundles' head factors --------------
    def _ov_point(self, blk):
        n_kv, r, d = self.n_kv, self.d_head, self.d_model
        wv = blk["v"].view(n_kv, r, d).mT  # (n_kv, d, r)
        wo = blk["o"].view(d, n_kv, self.n_rep, r).permute(1, 3, 2, 0)  # (n_kv, r, n_rep, d)
        return wv, wo.reshape(n_kv, r, self.n_rep * d)

    def _ov_weights(self, wv, wo):
        n_kv, r, d = self.n_kv, self.d_head, self.d_model
        o = wo.reshape(n_kv, r, self.n_rep, d).permute(3, 0, 2, 1).reshape(d, -1)
        return wv.mT.reshape(n_kv * r, d), o

    def _qk_point(self, blk):
        n_kv, r, d = self.n_kv, self.d_head, self.d_model
        wq = blk["q"].view(n_kv, self.n_rep, r, d).mT.reshape(n_kv, self.n_rep * d, r)
        return wq, blk["k"].view(n_kv, r, d).mT

    def _qk_weights(self, wq, wk):
        n_kv, r, d = self.n_kv, self.d_head, self.d_model
        q = wq.reshape(n_kv, self.n_rep, d, r).mT.reshape(n_kv * self.n_rep * r, d)
        return q, wk.mT.reshape(n_kv * r, d)

    # ---- elements ---------------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each part's element (blocks first for the per-block parts)."""
        n, m = self.n_layers, self.d_head // 2
        return dict(
            residual=(self.d_model, self.d_model),
            ov=(n, self.n_kv, self.d_head, self.d_head),
            qk=(n, self.n_kv, m, 2, 2),
            units=(n, self.n_units, 1, 1),
        )

    def identity(self, part: str, *, dtype=torch.float64, device=None) -> torch.Tensor:
        shape = self.shapes()[part]
        eye = torch.eye(shape[-1], dtype=dtype, device=device)
        return eye.expand(shape).clone()

    def act(self, weights: LlamaWeights, elements: dict[str, torch.Tensor]) -> LlamaWeights:
        """``weights`` moved by ``elements`` ({part: element}); differentiable in both."""
        unknown = set(elements) - set(PARTS)
        if unknown:
            raise ValueError(f"elements: unknown parts {sorted(unknown)}; the parts are {PARTS}")
        with M.unchecked():
            w = weights
            if "residual" in elements:
                w = w.with_tensors(self.residual.act(tuple(w.tensors()), elements["residual"]))
            blocks = []
            for i, blk in enumerate(w.blocks):
                blk = dict(blk)
                if "ov" in elements:
                    moved = self.ov.act(self._ov_point(blk), elements["ov"][i])
                    blk["v"], blk["o"] = self._ov_weights(*moved)
                if "qk" in elements:
                    moved = self.qk.act(self._qk_point(blk), elements["qk"][i])
                    blk["q"], blk["k"] = self._qk_weights(*moved)
                if "units" in elements:
                    point = (
                        blk["up"][:, :, None],
                        blk["down"].mT[:, None, :],
                    )  # (f, d, 1), (f, 1, d)
                    up, down = self.units.act(point, elements["units"][i])
                    blk["up"], blk["down"] = up[:, :, 0], down[:, 0, :].mT
                blocks.append(blk)
        return type(w)(**{**w.__dict__, "blocks": blocks})

    @staticmethod
    def exact(elements: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``elements`` in float64, the residual element replaced by its polar factor U Vᵀ."""
        out = {k: v.detach().double() for k, v in elements.items()}
        if "residual" in out:
            u, _, vh = torch.linalg.svd(out["residual"])
            out["residual"] = u @ vh
        return out
