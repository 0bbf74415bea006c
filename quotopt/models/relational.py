"""The relational transformer: manifest O(d) invariance by construction (docs/theory/relational.md).

Each token carries k = ``n_channels`` vectors in a gauge space R^D (D = ``d_gauge``). Every
learned weight mixes channels only, so it commutes with O(D) acting on the gauge axis; the only
parameters that carry the gauge axis are the embedding tables (``tok_emb``, optional ``pos_emb``).
Rotating every embedding vector by one R ∈ O(D) therefore leaves the logits unchanged: the O(D)
redundancy sits in one place.

Layout. The public tables are (V, k, D). Inside, the stream is kept channels-last, X of shape
(B, T, D, k): token i is a D×k matrix X_i whose columns x_iᵃ are its channel vectors, the gauge
acts on the left (X_i ↦ RᵀX_i) and weights on the right (X_i W), so every channel mix is one
plain GEMM over B·T·D rows.

Blocks (pre-norm, N = RMS over (D, k) without gains, which commutes with O(D)):

* Attention. Per head, q_i = X_i Wq, k_j = X_j Wk, v_j = X_j Wv (each D×r) with ``wq, wk, wv``
  (H, k, r); the score ⟨q_i, k_j⟩_F / √(rD) = Σ_ab (Wq Wkᵀ)_ab ⟨x_iᵃ, x_jᵇ⟩ / √(rD) is a linear
  functional of the token-channel Gram matrix, hence O(D)-invariant. q, k, v are flattened to
  r·D features and sent through ONE ``scaled_dot_product_attention`` call with
  ``is_causal=True``, so this code builds no T×T tensor. ALiBi enters as two extra query/key
  features (``_relational_attention``: exact, fused kernel and causal skipping kept); with
  ``alibi="bias"`` (and in half precision) a materialised (1, H, T, T) bias is used instead.
  The output Σ_j p_ij v_j is mixed back with ``wo`` (H, r, k). GL(r) per head is exact:
  (Wq g, Wk g⁻ᵀ) and (Wv g, g⁻¹ Wo).
* MLP. h = X W_in, g = X W_gate (D × m per token); each hidden channel vector is gated by a
  learned channel-Gram entry, h_c ↦ h_c · σ(⟨g_c, h_c⟩/√D), then mixed back with ``w_out``; the
  gate is an invariant scalar multiplying a vector, so the map is O(D)-equivariant. Its
  backward recomputes h and g from X (``_relational_mlp``), so it keeps no hidden-width tensor.
* Read-out. logit_v = α ⟨N(X_T), E_v⟩ over (D, k) with the tied token embedding E_v and a
  learnable scalar α (``logit_scale``); a scalar commutes with O(D). Classification uses the
  channel Gram matrix X_Tᵀ X_T / D of the last token (k² invariant features) and ``cls_head``.

Positions: ``"alibi"`` (gauge-free additive biases −m_h·(i − j), fixed geometric slopes) or
``"gauge"`` (a ``pos_emb`` (L, k, D) table in the gauge space, rotated with ``tok_emb``). The
feature route leaves out the keys whose bias is below −39.7 nats (float32) and keeps every
probability a normal float, so no subnormal arithmetic slows a CPU (``_relational_attention``).

Dressing (``dressed=True``): the canonical frame U ∈ O(D) is the eigenframe of the embedding
tables' gauge second moment C = Σ Eᵀ E (sum over every vocabulary/position row and channel;
C ↦ RᵀCR when the tables rotate, so E U is invariant). Signs are fixed by making the third moment
of the coordinates along each axis positive, an O(D)-equivariant rule. In that frame the MLP may
use a coordinate-wise GELU (a gauge-dependent op). The frame comes from the tables, not from the
sequence: a frame built from Σ_t X_tᵀX_t would let every position see the future of a causal
sequence. U is held constant in the backward pass (stop-gradient): the forward is exactly
invariant, gradients are O(D)-equivariant, and no 1/(λᵢ − λⱼ) blow-up occurs at near-degenerate
spectra (Dym, Lawrence, Siegel 2024: no canonicalisation is continuous everywhere). After each
forward, ``last_ambiguity`` holds ``{"eig_gap": min_i (λᵢ − λᵢ₊₁)/λ₁, "sign_margin": min_i
|m3_i| / Σ|coord|³}``; near 0 the frame is not unique and a tiny change of the tables can flip
or rotate it (the tie is still broken deterministically).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_positive, check_tokens, rms_norm
from ._relational_attention import (
    EXACT_DTYPES,
    alibi_attention,
    alibi_bias,
    alibi_slope_values,
    alibi_slopes,
    explicit_probs,
    reference_attention,
)
from ._relational_mlp import gram_gated_mlp

POSITIONAL = ("alibi", "gauge")
ALIBI = ("features", "bias")


@dataclass
class RelationalConfig:
    vocab_size: int  # number of token ids; inputs must lie in [0, vocab_size)
    n_channels: int  # k, channel vectors per token
    d_gauge: int  # D, dimension of the gauge space the channel vectors live in
    n_layers: int  # number of pre-norm blocks
    n_heads: int  # attention heads H per block
    max_len: int  # longest sequence accepted (and rows of pos_emb when positional="gauge")
    d_head: int | None = None  # r, channel rank per head; None -> max(1, n_channels // n_heads)
    d_mlp_channels: int | None = None  # m, hidden channels of the MLP; None -> 4 * n_channels
    n_classes: int | None = None  # if set, forward returns (B, n_classes) logits of the last token
    positional: str = "alibi"  # "alibi" (gauge-free biases) or "gauge" (pos_emb in gauge space)
    dressed: bool = False  # work in the embedding tables' canonical frame (see module docstring)
    strict_inputs: bool = True  # range-check token ids (one host sync per forward)
    alibi: str = "features"  # "features" (exact, no T×T tensor) or "bias" (materialised reference)
    lean_mlp: bool = True  # MLP backward recomputes h, g from its input instead of keeping them


class RelationalAttention(nn.Module):
    """Channel-space attention: ``wq, wk, wv`` (H, k, r), ``wo`` (H, r, k); see module docstring."""

    def __init__(self, n_channels: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.wq = nn.Parameter(torch.empty(n_heads, n_channels, d_head))
        self.wk = nn.Parameter(torch.empty(n_heads, n_channels, d_head))
        self.wv = nn.Parameter(torch.empty(n_heads, n_channels, d_head))
        self.wo = nn.Parameter(torch.empty(n_heads, d_head, n_channels))

    def qkv(self, x: torch.Tensor) -> torch.Tensor:
        """Per-head (queries / √(rD), keys, values) (3, B, H, T, D·r) of a stream x (B, T, D, k).

        The score scale 1/√(rD) is folded into Wq (a scalar: GL(r) and O(D) are unaffected)."""
        B, T, D, k = x.shape
        H, _, r = self.wq.shape
        w = torch.stack((self.wq / math.sqrt(r * D), self.wk, self.wv))  # (3, H, k, r)
        w = w.permute(2, 0, 1, 3).reshape(k, 3 * H * r)  # (k, 3·H·r)
        qkv = (x @ w).view(B, T, D, 3, H, r).permute(3, 0, 4, 1, 2, 5)  # (3, B, H, T, D, r)
        return qkv.reshape(3, B, H, T, D * r)

    def forward(
        self,
        x: torch.Tensor,
        slopes: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        host_slopes: tuple[float, ...] | None = None,
    ) -> torch.Tensor:
        """Causal attention; ALiBi with ``slopes`` (H,) by the feature route (``host_slopes``:
        the same as Python floats, for the windows), or with a materialised ``bias``
        (1, H, T, T) (which also carries the causal mask)."""
        B, T, D, k = x.shape
        H, r, _ = self.wo.shape
        qkv = self.qkv(x)  # (3, B, H, T, D·r)
        if slopes is not None and bias is None and qkv.dtype not in EXACT_DTYPES:
            bias = alibi_bias(slopes, T)  # half precision cannot hold the position features
        if slopes is not None and bias is None:
            y = alibi_attention(qkv, slopes, host_slopes)  # (B, H, T, D·r)
        else:
            y = reference_attention(qkv, bias)
        y = y.unflatten(-1, (D, r)).permute(0, 2, 3, 1, 4).reshape(B, T, D, H * r)  # (B,T,D,H·r)
        return y @ self.wo.reshape(H * r, k)  # (B, T, D, k)

    def probs(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Attention probabilities (B, H, T, T), materialised explicitly; for tests and analysis.

        ``bias``: an ``alibi_bias`` (1, H, T, T), or None for the plain causal mask."""
        return explicit_probs(self.qkv(x), bias)


class ChannelMLP(nn.Module):
    """Channel-mixing MLP with an invariant gate: ``w_in``, ``w_gate`` (k, m), ``w_out`` (m, k).

    h = X W_in and g = X W_gate (D × m per token); each hidden channel vector is scaled by a
    sigmoid of one learned channel-Gram entry,

        s_c = ⟨g_c, h_c⟩ / √D = Σ_ab (W_gate)_ac (W_in)_bc ⟨xᵃ, xᵇ⟩ / √D,     h_c ↦ h_c · σ(s_c),

    and mixed back, out = h W_out. s_c is O(D)-invariant and multiplies a vector, so the map is
    O(D)-equivariant; it is the vector analogue of a SiLU/GLU unit. (A 4-layer 32×4 probe on
    Shakespeare characters, 1,000 AdamW steps: this gate 2.02 validation nats, a norm gate
    h_c·gelu(‖h_c‖/√D + b_c)/(‖h_c‖/√D) 2.15.) In the dressed frame (``coordinate=True``) the
    gate is instead the coordinate-wise GELU of h, a gauge-dependent op, and ``w_gate`` is absent.
    """

    def __init__(
        self, n_channels: int, d_mlp: int, coordinate: bool = False, recompute: bool = True
    ) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(n_channels, d_mlp))
        if not coordinate:
            self.w_gate = nn.Parameter(torch.empty(n_channels, d_mlp))
        self.w_out = nn.Parameter(torch.empty(d_mlp, n_channels))
        self.coordinate = coordinate
        self.recompute = recompute  # backward recomputes h, g (``_relational_mlp``)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.coordinate:
            return F.gelu(x @ self.w_in) @ self.w_out  # (B, T, D, k)
        return gram_gated_mlp(x, self.w_in, self.w_gate, self.w_out, self.recompute)


class RelationalBlock(nn.Module):
    """Pre-norm block on the channels-last stream; N = RMS over (D, k) without gains."""

    def __init__(self, n_channels, n_heads, d_head, d_mlp, dressed: bool, lean_mlp: bool = True):
        super().__init__()
        self.attn = RelationalAttention(n_channels, n_heads, d_head)
        self.mlp = ChannelMLP(n_channels, d_mlp, coordinate=dressed, recompute=lean_mlp)

    def forward(self, x: torch.Tensor, slopes=None, bias=None, host_slopes=None) -> torch.Tensor:
        x = x + self.attn(rms_norm(x, 2), slopes, bias, host_slopes)
        return x + self.mlp(rms_norm(x, 2))


class RelationalTransformer(nn.Module):
    """Decoder-only causal LM with manifest O(d_gauge) invariance; see the module docstring.

    Same call contract as :class:`quotopt.models.Transformer`: ``forward(tokens, *,
    last_only=False)`` returns (B, T, V) logits, (B, 1, V) with ``last_only``, or (B, n_classes)
    when ``n_classes`` is set. Parameters: ``tok_emb`` (V, k, D), ``pos_emb`` (L, k, D) if
    ``positional="gauge"``, per block ``attn.wq|wk|wv`` (H, k, r), ``attn.wo`` (H, r, k),
    ``mlp.w_in`` (k, m), ``mlp.w_gate`` (k, m; absent when dressed), ``mlp.w_out`` (m, k), then
    ``logit_scale`` () or ``cls_head`` (n_classes, k²). Only the ``*emb`` tables have a gauge axis
    (their last, ``gauge_axis``). Dressed models set ``last_ambiguity`` on every forward.
    """

    gauge_axis = -1  # axis of every ``*emb`` parameter that O(d_gauge) acts on

    def __init__(
        self,
        vocab_size: int,
        n_channels: int,
        d_gauge: int,
        n_layers: int,
        n_heads: int,
        max_len: int,
        d_head: int | None = None,
        d_mlp_channels: int | None = None,
        n_classes: int | None = None,
        positional: str = "alibi",
        dressed: bool = False,
        strict_inputs: bool = True,
        alibi: str = "features",
        lean_mlp: bool = True,
    ) -> None:
        super().__init__()
        check_positive(
            vocab_size=vocab_size,
            n_channels=n_channels,
            d_gauge=d_gauge,
            n_layers=n_layers,
            n_heads=n_heads,
            max_len=max_len,
            d_head=d_head,
            d_mlp_channels=d_mlp_channels,
            n_classes=n_classes,
        )
        if positional not in POSITIONAL:
            raise ValueError(f"positional must be one of {POSITIONAL}, got {positional!r}")
        if alibi not in ALIBI:
            raise ValueError(f"alibi must be one of {ALIBI}, got {alibi!r}")
        d_head = max(1, n_channels // n_heads) if d_head is None else d_head
        d_mlp = 4 * n_channels if d_mlp_channels is None else d_mlp_channels
        self.config = RelationalConfig(
            vocab_size,
            n_channels,
            d_gauge,
            n_layers,
            n_heads,
            max_len,
            d_head,
            d_mlp,
            n_classes,
            positional,
            dressed,
            strict_inputs,
            alibi,
            lean_mlp,
        )
        k, D = n_channels, d_gauge
        self.tok_emb = nn.Parameter(torch.empty(vocab_size, k, D))
        if positional == "gauge":
            self.pos_emb = nn.Parameter(torch.empty(max_len, k, D))
        else:
            self.register_buffer("alibi_slopes", alibi_slopes(n_heads), persistent=False)
            self.host_slopes = alibi_slope_values(n_heads)  # for the windows, sync-free
        self.blocks = nn.ModuleList(
            RelationalBlock(k, n_heads, d_head, d_mlp, dressed, lean_mlp) for _ in range(n_layers)
        )
        if n_classes is not None:
            self.cls_head = nn.Parameter(torch.empty(n_classes, k * k))
        else:
            self.logit_scale = nn.Parameter(torch.ones(()))
        self.last_ambiguity: dict[str, torch.Tensor] | None = None
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: RelationalConfig) -> RelationalTransformer:
        return cls(**asdict(config))

    def symmetry_groups(self, metric: str = "euclidean", **options) -> list[dict]:
        """Every modelled exact symmetry, for ``quotopt.symmetries``: O(k) on the channel axis
        of every tensor jointly with GL(r) per head and O(d_gauge) on the ``*emb`` tables, one
        ``JointWithRotations`` group (``_relational_groups``: options ``heads``, ``residual``,
        ``rescaling``, ``channels``; with ``n_classes`` or ``dressed`` O(k) is not a modelled
        symmetry and the groups are O(d_gauge) and the heads)."""
        from ._relational_groups import relational_symmetry_groups

        return relational_symmetry_groups(self, metric, **options)

    def balance_undeclared(self) -> float:
        """One pass to the minimal-norm point along the symmetries no bundle declares — the
        gated MLP's per-channel rescalings and the stream scale — in place; returns the largest
        |log| of the scales applied (``_relational_groups.balance_undeclared``)."""
        from ._relational_groups import balance_undeclared

        return balance_undeclared(self)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # Channel weights ~ N(0, 1/fan_in): every channel mix preserves the O(1) entries that the
        # norm produces, so the scores ⟨q, k⟩/√(rD) are O(1) — attention neither uniform nor
        # saturated. Embeddings N(0, 0.02²) as in GPT-2 (0.1 and 0.5 trained worse, by 0.08 and
        # 0.3 nats in a 500-step character-LM probe); the 2·n_layers residual writes (wo, w_out)
        # are scaled by 1/√(2·n_layers) as in GPT-2; logit_scale starts at 1 (a fixed 1/√(kD)
        # left the logits too small to train: 0.75 nats worse in the same probe).
        for name, p in self.named_parameters():
            if "emb" in name:
                nn.init.normal_(p, std=0.02)
            elif name == "logit_scale":
                p.fill_(1.0)
            elif name == "cls_head":  # (n_classes, k²) reads the O(1) Gram features
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[-1]))
            else:  # (…, fan_in, fan_out) with fan_in the channel (or head·rank) axis
                nn.init.normal_(p, std=1.0 / math.sqrt(p.shape[-2]))
        for block in self.blocks:
            block.attn.wo.mul_(1.0 / math.sqrt(2 * self.config.n_layers))
            block.mlp.w_out.mul_(1.0 / math.sqrt(2 * self.config.n_layers))

    def frame(self) -> torch.Tensor:
        """Canonical frame U (D, D) ∈ O(D) of the embedding tables; sets ``last_ambiguity``.

        Eigenvectors of C = Σ eᵀe over all embedding rows e (D,), by decreasing eigenvalue, each
        signed so that Σ (e·u)³ ≥ 0. Computed without autograd (stop-gradient, see the module
        docstring) and in at least float32, outside autocast.
        """
        dtype = self.tok_emb.dtype
        with torch.no_grad(), torch.autocast(self.tok_emb.device.type, enabled=False):
            rows = [self.tok_emb.reshape(-1, self.config.d_gauge)]  # (V·k, D)
            if self.config.positional == "gauge":
                rows.append(self.pos_emb.reshape(-1, self.config.d_gauge))  # (L·k, D)
            e = torch.cat(rows).to(torch.promote_types(dtype, torch.float32))  # (N, D)
            evals, U = torch.linalg.eigh(e.T @ e)  # ascending
            evals, U = evals.flip(0), U.flip(1)  # descending
            m3 = (e @ U).pow(3).sum(0)  # (D,) third moments: an O(D)-equivariant sign rule
            U = U * torch.where(m3 < 0, -1.0, 1.0).to(U.dtype)
            gaps = (evals[:-1] - evals[1:]) / evals[0].clamp_min(torch.finfo(e.dtype).tiny)
            eig_gap = gaps.min() if gaps.numel() else evals.new_ones(())
            sign_margin = (m3.abs() / (e @ U).abs().pow(3).sum(0).clamp_min(1e-30)).min()
            self.last_ambiguity = {"eig_gap": eig_gap, "sign_margin": sign_margin}
        return U.to(dtype)

    def forward(self, tokens: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        cfg = self.config
        tokens = check_tokens(tokens, cfg.vocab_size, cfg.max_len, cfg.strict_inputs)
        T = tokens.shape[1]
        emb = self.tok_emb  # (V, k, D)
        pos = self.pos_emb[:T] if cfg.positional == "gauge" else None  # (T, k, D)
        if cfg.dressed:
            U = self.frame()
            emb = emb @ U
            pos = None if pos is None else pos @ U
        x = F.embedding(tokens, emb.flatten(1))  # (B, T, k·D)
        x = x.unflatten(-1, (cfg.n_channels, cfg.d_gauge))  # (B, T, k, D)
        if pos is not None:
            x = x + pos
        x = x.transpose(-1, -2).contiguous()  # (B, T, D, k) channels-last
        slopes = None if pos is not None else self.alibi_slopes  # (H,)
        bias = alibi_bias(slopes, T) if slopes is not None and cfg.alibi == "bias" else None
        host = None if slopes is None else self.host_slopes  # Python floats, for the windows
        for block in self.blocks:
            x = block(x, slopes, bias, host)  # bias (1, H, T, T): built once, shared by the layers
        if cfg.n_classes is not None:
            x = rms_norm(x[:, -1], 2)  # (B, D, k)
            gram = x.transpose(-1, -2) @ x / cfg.d_gauge  # (B, k, k) channel Gram, invariant
            return gram.flatten(1) @ self.cls_head.T  # (B, n_classes)
        if last_only:
            x = x[:, -1:]  # (B, 1, D, k)
        x = rms_norm(x, 2).transpose(-1, -2).flatten(2)  # (B, T | 1, k·D)
        return self.logit_scale * (x @ emb.flatten(1).T)  # (B, T | 1, V)
