r"""A LLaMA-family causal LM as plain tensors, and its forward pass with fake quantisation.

``LlamaWeights.from_hf(model)`` reads a Hugging Face ``LlamaForCausalLM`` whose RMSNorm gains are
folded (``quotopt.groups.fold_rms_gains``): the embedding, per block the seven projection
weights in ``nn.Linear`` layout (out, in), and the read-out; RoPE's frequencies, the norm's ε and
the head counts (grouped-query attention included). ``write_into(model)`` copies the weights back.
``forward(weights, tokens, quant)`` computes the logits exactly as the Hugging Face model does
(the gain-free RMSNorm in the tensors' own precision, so that float64 checks reach round-off),
with ``QuantSpec`` fake quantisation where a W·A·KV-quantised model rounds: the weights of the
seven projections of every block, the inputs of those projections per token, and the keys
(after RoPE) and values per token and head. The embedding and the read-out stay in full
precision, as in QuaRot and SpinQuant. ``capture`` collects the quantised linear maps' inputs
(for the outlier measures).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from .quantisers import QuantSpec

__all__ = ["LlamaWeights", "forward", "LINEARS", "READS"]

#: the projections of one block, in ``nn.Linear`` layout (out, in)
LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
#: which of them read the residual stream (the others, ``o`` and ``down``, write it)
READS = ("q", "k", "v", "gate", "up")
_HF = dict(
    q="self_attn.q_proj",
    k="self_attn.k_proj",
    v="self_attn.v_proj",
    o="self_attn.o_proj",
    gate="mlp.gate_proj",
    up="mlp.up_proj",
    down="mlp.down_proj",
)


@dataclasses.dataclass
class LlamaWeights:
    """The tensors of a gain-folded LLaMA (module docstring); ``blocks[l][name]`` is (out, in)."""

    embed: torch.Tensor  # (V, d)
    blocks: list[dict[str, torch.Tensor]]  # per block: q, k, v, o, gate, up, down
    head: torch.Tensor  # (V, d) read-out
    inv_freq: torch.Tensor  # (r/2,) RoPE frequencies (pairing "half": planes (i, i + r/2))
    n_heads: int
    n_kv: int
    eps: float
    rope_scale: float = 1.0  # RoPE's attention scaling of cos and sin (1 for plain RoPE)

    @property
    def d_model(self) -> int:
        return self.embed.shape[1]

    @property
    def d_head(self) -> int:
        return self.blocks[0]["q"].shape[0] // self.n_heads

    def tensors(self) -> list[torch.Tensor]:
        """Every weight, in the order ``with_tensors`` reads back."""
        return [self.embed] + [b[n] for b in self.blocks for n in LINEARS] + [self.head]

    def with_tensors(self, tensors) -> LlamaWeights:
        it = iter(tensors)
        embed = next(it)
        blocks = [{n: next(it) for n in LINEARS} for _ in self.blocks]
        return dataclasses.replace(self, embed=embed, blocks=blocks, head=next(it))

    def to(self, dtype) -> LlamaWeights:
        return self.with_tensors([t.to(dtype) for t in self.tensors()])

    def detach(self) -> LlamaWeights:
        return self.with_tensors([t.detach() for t in self.tensors()])

    @classmethod
    @torch.no_grad()
    def from_hf(cls, model) -> LlamaWeights:
        """Copies of a gain-folded Hugging Face LLaMA's weights. Raises ``ValueError`` where a
        norm keeps a gain, a projection has a bias, or RoPE is not the plain "half" pairing."""
        inner = model.model
        norms = [inner.norm] + [
            n for b in inner.layers for n in (b.input_layernorm, b.post_attention_layernorm)
        ]
        if any(not bool((n.weight == 1).all()) for n in norms):
            raise ValueError(
                "model: RMSNorm gains are not folded; call "
                "quotopt.groups.fold_rms_gains(model) first"
            )
        blocks = []
        for i, layer in enumerate(inner.layers):
            block = {}
            for name, path in _HF.items():
                linear = layer.get_submodule(path)
                if linear.bias is not None:
                    raise ValueError(
                        f"model.layers.{i}.{path} has a bias; biased projections "
                        "are not supported by quotopt.gauge"
                    )
                block[name] = linear.weight.detach().clone()
            blocks.append(block)
        attn, config = inner.layers[0].self_attn, model.config
        rotary = inner.rotary_emb
        return cls(
            embed=inner.embed_tokens.weight.detach().clone(),
            blocks=blocks,
            head=model.lm_head.weight.detach().clone(),
            inv_freq=rotary.inv_freq.detach().clone().to(attn.q_proj.weight.dtype),
            n_heads=config.num_attention_heads,
            n_kv=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            eps=float(config.rms_norm_eps),
            rope_scale=float(getattr(rotary, "attention_scaling", 1.0)),
        )

    @torch.no_grad()
    def write_into(self, model) -> None:
        """Copy these weights into ``model`` (same architecture), in its dtype."""
        inner = model.model
        inner.embed_tokens.weight.copy_(self.embed)
        model.lm_head.weight.copy_(self.head)
        for layer, block in zip(inner.layers, self.blocks):
            for name, path in _HF.items():
                layer.get_submodule(path).weight.copy_(block[name])


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), -1)


def _rope(w: LlamaWeights, t: int, like: torch.Tensor):
    angles = torch.arange(t, dtype=like.dtype, device=like.device)[:, None] * w.inv_freq.to(like)
    angles = torch.cat((angles, angles), -1)  # (T, r)
    return angles.cos() * w.rope_scale, angles.sin() * w.rope_scale


def _linear(x, weight, quant: QuantSpec | None, capture, key):
    if capture is not None and key is not None:
        capture.setdefault(key, []).append(x)
    if quant is None:
        return x @ weight.mT
    return quant.tokens(x) @ quant.weight(weight).mT


def forward(
    w: LlamaWeights, tokens: torch.Tensor, quant: QuantSpec | None = None, capture=None
) -> torch.Tensor:
    """Logits (B, T, V) of ``w`` on ``tokens`` (B, T), fake-quantised by ``quant`` (None: full
    precision). ``capture``: a dict that receives each quantised linear map's inputs under
    ``(block, name)`` (one entry per input tensor: q/k/v share one, gate/up share one)."""
    b, t = tokens.shape
    h, n_kv, r = w.n_heads, w.n_kv, w.d_head
    cos, sin = _rope(w, t, w.embed)
    x = w.embed[tokens]  # (B, T, d)
    for i, blk in enumerate(w.blocks):
        y = _rms(x, w.eps)
        q = _linear(y, blk["q"], quant, capture, (i, "qkv")).view(b, t, h, r).transpose(1, 2)
        k = _linear(y, blk["k"], quant, None, None).view(b, t, n_kv, r).transpose(1, 2)
        v = _linear(y, blk["v"], quant, None, None).view(b, t, n_kv, r).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin  # (B, H, T, r)
        if quant is not None:
            k, v = quant.cache(k), quant.cache(v)
        k, v = k.repeat_interleave(h // n_kv, 1), v.repeat_interleave(h // n_kv, 1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, r)
        att = att.transpose(1, 2).reshape(b, t, h * r)
        x = x + _linear(att, blk["o"], quant, capture, (i, "o"))
        y = _rms(x, w.eps)
        gate = _linear(y, blk["gate"], quant, capture, (i, "gate_up"))
        mid = F.silu(gate) * _linear(y, blk["up"], quant, None, None)
        x = x + _linear(mid, blk["down"], quant, capture, (i, "down"))
    return _rms(x, w.eps) @ w.head.mT
