"""A decoder-only causal transformer whose parameters are laid out in the symmetry geometry.

Architecture (nanoGPT-sized): learned token and position embeddings, ``n_layers`` pre-norm blocks
``x ← x + Attn(N(x)); x ← x + MLP(N(x))``, a final norm and a linear read-out. N is RMSNorm
**without** gains or centering, and there are no biases. Row-vector convention: a sequence is
``X`` of shape (B, T, d) and layers compute ``X @ W``.

Exact symmetries (both checked to round-off in ``tests/models/test_models.py``):

* **O(d) on the model space.** N(XR) = N(X)R for orthogonal R, so replacing every tensor by
  T′[…, j, …] = Σᵢ T[…, i, …] R[i, j] along its model-space axis leaves the logits unchanged.
  Model-space axes (for ``manifolds.ResidualRotation``):

  ==========================  ==============  ==========
  parameter                   shape           axis
  ==========================  ==============  ==========
  ``tok_emb``, ``pos_emb``    (V | L, d)      1
  ``blocks.i.attn.wq|wk|wv``  (H, d, r)       1
  ``blocks.i.attn.wo``        (H, r, d)       2
  ``blocks.i.mlp.w_in``       (d, d_mlp)      0
  ``blocks.i.mlp.w_out``      (d_mlp, d)      1
  ``lm_head`` / ``cls_head``  (V | C, d)      1
  ==========================  ==============  ==========

* **GL(r) per head.** Head h scores (X Wq[h])(X Wk[h])ᵀ and writes softmax(·) X Wv[h] Wo[h], so
  for invertible g (H, r, r): (Wq g, Wk g⁻ᵀ) and (Wv g, g⁻¹ Wo) are exact symmetries; the
  invariants are the head composites Wq Wkᵀ and Wv Wo (``manifolds.HeadQK`` / ``HeadOV``).
  The attention scale 1/√r depends on r only, so it does not break this. Optional fixed
  biases ``q_bias``/``v_bias`` (``quotopt.lab.baselines.add_random_biases``) shrink it to the
  stabiliser {g : b g = b} of the bias.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..groups.declare import factored_heads, joint, matmul_units, rotation
from ._common import check_positive, check_tokens, rms_norm

ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}
# Model-space axis of each parameter, by name suffix (the table of the module docstring).
MODEL_AXES = {
    "tok_emb": 1,
    "pos_emb": 1,
    "wq": 1,
    "wk": 1,
    "wv": 1,
    "wo": 2,
    "w_in": 0,
    "w_out": 1,
    "lm_head": 1,
    "cls_head": 1,
}


@dataclass
class TransformerConfig:
    vocab_size: int  # number of token ids; inputs must lie in [0, vocab_size)
    d_model: int  # width d of the residual stream (the O(d) model space)
    n_layers: int  # number of pre-norm blocks
    n_heads: int  # attention heads H per block
    max_len: int  # longest sequence the learned positional table covers
    d_head: int | None = None  # r, per-head query/key/value width; None -> d_model // n_heads
    d_mlp: int | None = None  # MLP hidden width; None -> 4 * d_model
    activation: str = "gelu"  # MLP nonlinearity: "gelu" or "relu"
    n_classes: int | None = None  # if set, forward returns (B, n_classes) logits of the last token
    tie_embeddings: bool = False  # read logits out with tok_emb (no lm_head parameter)
    strict_inputs: bool = True  # range-check token ids (one host sync per forward)


class CausalSelfAttention(nn.Module):
    """Multi-head causal attention with per-head factors ``wq, wk, wv`` (H, d, r), ``wo`` (H, r, d).

    Output: Σ_h softmax((X Wq[h])(X Wk[h])ᵀ / √r + causal mask) (X Wv[h]) Wo[h].

    Buffers ``q_bias`` and ``v_bias`` (H, r) are ``None`` by default; when set, they are added
    to every query and value (fixed, not learned; ``quotopt.lab.baselines.add_random_biases``).
    They are in the state dict only when set, so a model saved with them must have them set
    before ``load_state_dict``.
    """

    def __init__(self, d_model: int, n_heads: int, d_head: int) -> None:
        super().__init__()
        self.wq = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.wk = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.wv = nn.Parameter(torch.empty(n_heads, d_model, d_head))
        self.wo = nn.Parameter(torch.empty(n_heads, d_head, d_model))
        self.register_buffer("q_bias", None)
        self.register_buffer("v_bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        H, _, r = self.wq.shape
        # One GEMM for q, k and v of every head (the weight copy is O(d·H·r), negligible).
        w = torch.stack((self.wq, self.wk, self.wv))  # (3, H, d, r)
        w = w.permute(2, 0, 1, 3).reshape(d, 3 * H * r)  # (d, 3·H·r)
        qkv = (x @ w).view(B, T, 3, H, r).permute(2, 0, 3, 1, 4)  # (3, B, H, T, r)
        q, k, v = qkv.unbind(0)  # each (B, H, T, r)
        if self.q_bias is not None:
            q = q + self.q_bias[:, None, :]  # (H, 1, r) broadcast over batch and positions
        if self.v_bias is not None:
            v = v + self.v_bias[:, None, :]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, r)
        y = y.transpose(1, 2).reshape(B, T, H * r)  # (B, T, H·r)
        return y @ self.wo.reshape(H * r, d)  # (B, T, d)


class MLP(nn.Module):
    """act(X W_in) W_out with ``w_in`` (d, d_mlp) and ``w_out`` (d_mlp, d); no biases."""

    def __init__(self, d_model: int, d_mlp: int, activation: str) -> None:
        super().__init__()
        self.w_in = nn.Parameter(torch.empty(d_model, d_mlp))
        self.w_out = nn.Parameter(torch.empty(d_mlp, d_model))
        self.act = ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x @ self.w_in) @ self.w_out  # (B, T, d)


class Block(nn.Module):
    """Pre-norm residual block: x + Attn(N(x)), then + MLP(N(x)), N = gain-free RMSNorm."""

    def __init__(self, d_model: int, n_heads: int, d_head: int, d_mlp: int, activation: str):
        super().__init__()
        self.attn = CausalSelfAttention(d_model, n_heads, d_head)
        self.mlp = MLP(d_model, d_mlp, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(rms_norm(x))
        return x + self.mlp(rms_norm(x))


class Transformer(nn.Module):
    """Decoder-only causal LM (or last-token classifier); see the module docstring.

    ``forward(tokens, *, last_only=False)`` maps int tokens (B, T) to logits (B, T, V); with
    ``last_only=True`` only the last position is normed and read out: (B, 1, V). With
    ``n_classes`` set it returns (B, n_classes) from the last position instead, and the model has
    a ``cls_head`` (n_classes, d) and no ``lm_head``. With ``tie_embeddings`` the read-out is
    ``tok_emb`` itself. ``strict_inputs=False`` skips the token-range check, the one host sync.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_layers: int,
        n_heads: int,
        max_len: int,
        d_head: int | None = None,
        d_mlp: int | None = None,
        activation: str = "gelu",
        n_classes: int | None = None,
        tie_embeddings: bool = False,
        strict_inputs: bool = True,
    ) -> None:
        super().__init__()
        check_positive(
            vocab_size=vocab_size,
            d_model=d_model,
            n_layers=n_layers,
            n_heads=n_heads,
            max_len=max_len,
            d_head=d_head,
            d_mlp=d_mlp,
            n_classes=n_classes,
        )
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
        if d_head is None:
            if d_model % n_heads:
                raise ValueError(
                    f"d_model ({d_model}) must be divisible by n_heads ({n_heads}) "
                    "unless d_head is given"
                )
            d_head = d_model // n_heads
        d_mlp = 4 * d_model if d_mlp is None else d_mlp
        self.config = TransformerConfig(
            vocab_size,
            d_model,
            n_layers,
            n_heads,
            max_len,
            d_head,
            d_mlp,
            activation,
            n_classes,
            tie_embeddings,
            strict_inputs,
        )
        self.tok_emb = nn.Parameter(torch.empty(vocab_size, d_model))
        self.pos_emb = nn.Parameter(torch.empty(max_len, d_model))
        self.blocks = nn.ModuleList(
            Block(d_model, n_heads, d_head, d_mlp, activation) for _ in range(n_layers)
        )
        if n_classes is not None:
            self.cls_head = nn.Parameter(torch.empty(n_classes, d_model))
        elif not tie_embeddings:
            self.lm_head = nn.Parameter(torch.empty(vocab_size, d_model))
        self.reset_parameters()

    @classmethod
    def from_config(cls, config: TransformerConfig) -> Transformer:
        return cls(**asdict(config))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        # GPT-2 init: N(0, 0.02²) everywhere; the 2·n_layers residual writes (wo, w_out) are
        # scaled by 1/√(2·n_layers) so the stream's variance stays O(1) whatever the depth.
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=0.02)
        for block in self.blocks:
            block.attn.wo.mul_(1.0 / math.sqrt(2 * self.config.n_layers))
            block.mlp.w_out.mul_(1.0 / math.sqrt(2 * self.config.n_layers))

    def symmetry_groups(
        self,
        metric: str = "euclidean",
        *,
        heads=True,
        residual=False,
        rescaling=True,
        solver: str = "auto",
    ) -> list[dict]:
        """This model's symmetry groups, for ``quotopt.symmetries`` (see the module docstring).

        ``heads``: GL(r) per head (``HeadQK`` + ``HeadOV`` per block); ``rescaling``: positive
        rescaling of ReLU units; ``residual=True``: O(d) on every tensor — with ``heads`` one
        joint O(d) × GL(r) group (the actions share the attention weights, the vertical space
        is a sum; ``solver`` is its projection's, see ``manifolds.joint``), without it O(d)
        alone; ``"auto"`` means no O(d) here (it is not disjoint from the heads).
        """
        if residual is True:
            named = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
            axes = [MODEL_AXES[n.rsplit(".", 1)[-1]] for n, _ in named]
            if heads:  # O(d) and the heads' GL(r) act jointly: one JointBundle group
                attns = [block.attn for block in self.blocks]
                return [joint(named, self.config.d_model, axes, attns, metric, solver)]
            return [rotation("residual", named, self.config.d_model, axes)]
        groups = []
        for i, block in enumerate(self.blocks):
            if heads:
                groups += factored_heads(f"blocks.{i}.attn.", block.attn, metric)
            if rescaling:
                groups += matmul_units(f"blocks.{i}.mlp.", block.mlp, metric)
        return groups

    @property
    def readout(self) -> torch.Tensor:
        """The (V, d) or (n_classes, d) matrix whose rows the final state is dotted with."""
        if self.config.n_classes is not None:
            return self.cls_head
        return self.tok_emb if self.config.tie_embeddings else self.lm_head

    def forward(self, tokens: torch.Tensor, *, last_only: bool = False) -> torch.Tensor:
        cfg = self.config
        tokens = check_tokens(tokens, cfg.vocab_size, cfg.max_len, cfg.strict_inputs)
        T = tokens.shape[1]
        x = F.embedding(tokens, self.tok_emb) + self.pos_emb[:T]  # (B, T, d)
        for block in self.blocks:
            x = block(x)
        if cfg.n_classes is not None:
            x = x[:, -1]  # (B, d): classify from the last position
        elif last_only:
            x = x[:, -1:]  # (B, 1, d)
        return rms_norm(x) @ self.readout.T  # (B, n_classes) or (B, T | 1, V)
