"""Wrap three models with ``quotopt.symmetries`` and verify every symmetry it reports.

1. ``quotopt.models.Transformer`` — per-head GL(r) on (W_q, W_k) and (W_v, W_o), positive
   rescaling of the ReLU units; detected.
2. ``torch.nn.TransformerEncoder`` — the heads of ``nn.MultiheadAttention`` (fused
   ``in_proj_weight``, biases folded in as one more row) and the ReLU units of
   ``linear1``/``linear2``; detected through layouts onto torch's own storage.
3. A custom attention module with separate ``nn.Linear`` projections, whose head bundles the
   user declares with ``declared=[...]`` and a ``quotopt.groups.layouts.Layout``.

``quotopt.verify`` applies a random group element (condition number 10) to each group of a deep
copy and reports the largest relative change of the output: round-off (~1e-15 in float64) for
a true symmetry. The last table declares a deliberately wrong pairing (W_q with W_v) to show what a
mistake looks like. Run ``python examples/wrap_and_verify.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import manifolds
import quotopt
from quotopt.groups.layouts import Layout
from quotopt.models import Transformer


# ---- a custom attention module and its layouts -----------------------------------------------
# --8<-- [start:custom]
class SeparateProjectionAttention(nn.Module):
    """Causal multi-head attention with bias-free q/k/v/o ``nn.Linear`` projections."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.o = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        heads = lambda t: t.view(B, T, self.n_heads, -1).transpose(1, 2)  # noqa: E731 (B,H,T,r)
        y = F.scaled_dot_product_attention(
            heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), is_causal=True
        )
        return self.o(y.transpose(1, 2).reshape(B, T, d))


class LinearHeadsIn(Layout):
    """Two ``nn.Linear`` weights (H·r, d) that produce per-head features → two (H, d, r) views."""

    def __init__(self, n_heads: int):
        self.n_heads = n_heads
        self.description = f"H={n_heads}, (H·r, d) -> (H, d, r)"

    def gather(self, tensors):
        return tuple(w.view(self.n_heads, -1, w.shape[1]).transpose(1, 2) for w in tensors)


class LinearHeadsValueOutput(LinearHeadsIn):
    """``[v.weight (H·r, d), o.weight (d, H·r)]`` → views W_v (H, d, r), W_o (H, r, d)."""

    def gather(self, tensors):
        w_v, w_o = tensors
        (a,) = super().gather([w_v])
        return a, w_o.view(w_o.shape[0], self.n_heads, -1).permute(1, 2, 0)


class TinyCustomModel(nn.Module):
    """Embedding → custom attention (residual) → linear read-out."""

    def __init__(self, vocab: int, d_model: int, n_heads: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.attn = SeparateProjectionAttention(d_model, n_heads)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        return self.head(x + self.attn(x))


def declared_heads(attn: SeparateProjectionAttention, metric: str = "euclidean") -> list[dict]:
    """The two head groups of the custom module, in the form ``symmetries(declared=...)`` takes."""
    h, d = attn.n_heads, attn.q.in_features
    r = attn.q.out_features // h
    return [
        {
            "params": [attn.q.weight, attn.k.weight],
            "bundle": manifolds.HeadQK(h, d, r, metric),
            "layout": LinearHeadsIn(h),
            "name": "attn.qk",
        },
        {
            "params": [attn.v.weight, attn.o.weight],
            "bundle": manifolds.HeadOV(h, d, r, metric),
            "layout": LinearHeadsValueOutput(h),
            "name": "attn.ov",
        },
    ]


# --8<-- [end:custom]
# ---- the run ---------------------------------------------------------------------------------
def _describe(bundle) -> str:
    if bundle is None:
        return "(plain)"
    components = getattr(bundle, "components", (bundle,))  # a ProductBundle lists its parts
    return " x ".join(type(c).__name__ for c in components)


def _table(title: str, groups: list[dict], changes: dict[str, float]) -> None:
    print(f"\n{title}")
    print(f"  {'group':<26} {'bundle':<18} {'dim G':>6} {'output change':>14}")
    for group in groups:
        bundle = group.get("bundle")
        dim = "-" if bundle is None else str(bundle.group_dim)
        change = changes.get(group["name"])
        shown = "-" if change is None else f"{change:.1e}"
        print(f"  {group['name']:<26} {_describe(bundle):<18} {dim:>6} {shown:>14}")


def run(d_model: int = 16, n_heads: int = 4, seq_len: int = 8, batch: int = 3, seed: int = 0):
    """Build, wrap and verify the three models (float64); return ``{model: {group: change}}``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = 11
    tokens = torch.randint(vocab, (batch, seq_len), generator=gen)
    results = {}

    ours = Transformer(vocab, d_model, 2, n_heads, seq_len, activation="relu").double()
    groups = quotopt.symmetries(ours)
    results["Transformer"] = quotopt.verify(ours, groups, tokens, generator=gen)
    _table("quotopt.models.Transformer", groups, results["Transformer"])

    layer = nn.TransformerEncoderLayer(
        d_model, n_heads, 4 * d_model, dropout=0.0, activation="relu", batch_first=True
    )
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).double().eval()
    x = torch.randn(batch, seq_len, d_model, dtype=torch.float64, generator=gen)
    groups = quotopt.symmetries(encoder)
    results["TransformerEncoder"] = quotopt.verify(encoder, groups, x, generator=gen)
    _table("torch.nn.TransformerEncoder (post-norm, ReLU)", groups, results["TransformerEncoder"])

    custom = TinyCustomModel(vocab, d_model, n_heads).double()
    groups = quotopt.symmetries(custom, declared=declared_heads(custom.attn))
    results["custom"] = quotopt.verify(custom, groups, tokens, generator=gen)
    _table("custom attention, declared bundles", groups, results["custom"])

    # a mistake verify catches: W_q paired with W_v instead of W_k
    h, r = n_heads, d_model // n_heads
    wrong = [
        {
            "params": [custom.attn.q.weight, custom.attn.v.weight],
            "bundle": manifolds.HeadQK(h, d_model, r),
            "layout": LinearHeadsIn(h),
            "name": "q with v (wrong)",
        }
    ]
    groups = quotopt.symmetries(custom, declared=wrong)
    results["custom (wrong)"] = quotopt.verify(custom, groups, tokens, generator=gen)
    _table("a wrong declaration: W_q paired with W_v", groups[:1], results["custom (wrong)"])
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    run()
