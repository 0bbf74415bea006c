"""Training arithmetic per token of both models, counted from their configs.

The count is of **contractions** (sums of products: every GEMM, the attention scores and the
attention-weighted sum of values, the relational MLP's gate Gram entries), at 2 FLOPs per
multiply-add; elementwise work (norms, softmax, activations, residual adds) and embedding
look-ups are left out, as in Kaplan et al. (2020) and Chinchilla's accounting. For a causal
sequence of T tokens a query attends to (T + 1)/2 keys on average.

Forward, per token and layer, standard ``Transformer`` (width d, H heads of size r, MLP d_mlp):

    qkv 2·d·3Hr,  scores 2·Hr·(T+1)/2,  values 2·Hr·(T+1)/2,  out 2·Hr·d,  mlp 2·2·d·d_mlp;

relational ``RelationalTransformer`` (k channels, gauge D, H heads of channel rank r, m hidden
channels; a head's feature size is F = D·r, plus the 2 ALiBi position features on the
``alibi="features"`` route, which pads the values too; the further zero coordinates of the
CUDA route are not counted):

    qkv 2·D·k·3Hr,  scores 2·H·F·(T+1)/2,  values 2·H·F·(T+1)/2,  out 2·D·Hr·k,
    mlp 2·D·k·2m + 2·D·m (gate Gram entries) + 2·D·m·k   (dressed: 2·D·k·m + 2·D·m·k).

Read-out: 2·d·V (relational 2·k·D·V); a last-token classifier's cost is divided by T. Training
is forward + backward = 3 × forward (the backward of a contraction is two contractions of the
same size), plus what the implementation recomputes on purpose: the lean relational MLP
(``lean_mlp``) redoes its first GEMM and the Gram entries, 2·D·k·2m + 2·D·m per layer. Work a
kernel repeats internally (the fused attention backward recomputes the scores) is the same for
both models and is not counted.
"""

from __future__ import annotations

from .relational import RelationalConfig
from .transformer import TransformerConfig

__all__ = ["flops_per_token", "training_flops_per_token"]


def _attention(heads: int, features: int, seq_len: int) -> dict[str, float]:
    keys = (seq_len + 1) / 2  # mean number of keys a causal query attends to
    return {"scores": 2 * heads * features * keys, "values": 2 * heads * features * keys}


def _standard(cfg: TransformerConfig, seq_len: int) -> dict[str, float]:
    d, H, r, L = cfg.d_model, cfg.n_heads, cfg.d_head, cfg.n_layers
    layer = {"qkv": 2 * d * 3 * H * r, **_attention(H, r, seq_len), "out": 2 * H * r * d}
    layer["mlp"] = 2 * 2 * d * cfg.d_mlp
    readout = 2 * d * (cfg.vocab_size if cfg.n_classes is None else cfg.n_classes / seq_len)
    return {**{k: L * v for k, v in layer.items()}, "readout": readout, "recompute": 0.0}


def _relational(cfg: RelationalConfig, seq_len: int) -> dict[str, float]:
    k, D, H, r, m, L = (
        cfg.n_channels,
        cfg.d_gauge,
        cfg.n_heads,
        cfg.d_head,
        cfg.d_mlp_channels,
        cfg.n_layers,
    )
    features = D * r + (2 if cfg.positional == "alibi" and cfg.alibi == "features" else 0)
    layer = {"qkv": 2 * D * k * 3 * H * r, **_attention(H, features, seq_len)}
    layer["out"] = 2 * D * H * r * k
    if cfg.dressed:  # coordinate-wise GELU, no gate
        layer["mlp"], recompute = 2 * D * k * m + 2 * D * m * k, 0.0
    else:
        first = 2 * D * k * 2 * m + 2 * D * m  # [h, g] = X [W_in | W_gate] and ⟨g_c, h_c⟩
        layer["mlp"], recompute = first + 2 * D * m * k, first if cfg.lean_mlp else 0.0
    if cfg.n_classes is None:
        readout = 2 * k * D * cfg.vocab_size
    else:  # channel Gram of the last token, then the class head
        readout = (2 * D * k * k + 2 * k * k * cfg.n_classes) / seq_len
    return {**{n: L * v for n, v in layer.items()}, "readout": readout, "recompute": L * recompute}


def flops_per_token(model, seq_len: int) -> dict[str, float]:
    """Forward FLOPs per token by part (``qkv``, ``scores``, ``values``, ``out``, ``mlp`` over
    all layers; ``readout``), the backward's deliberate ``recompute``, and the sums
    ``forward`` and ``training`` (= 3·forward + recompute), for a model or its config at
    sequence length ``seq_len`` (see the module docstring)."""
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    cfg = getattr(model, "config", model)
    if isinstance(cfg, TransformerConfig):
        parts = _standard(cfg, seq_len)
    elif isinstance(cfg, RelationalConfig):
        parts = _relational(cfg, seq_len)
    else:
        raise TypeError(
            "model must be a Transformer, a RelationalTransformer or one of their configs, "
            f"got {type(model).__name__}"
        )
    forward = sum(v for n, v in parts.items() if n != "recompute")
    return {**parts, "forward": forward, "training": 3 * forward + parts["recompute"]}


def training_flops_per_token(model, seq_len: int) -> float:
    """Forward + backward FLOPs per token of training at ``seq_len`` (``flops_per_token``)."""
    return flops_per_token(model, seq_len)["training"]
