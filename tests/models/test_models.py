"""Tests for quotopt.models: shapes, exact symmetries (float64), input validation, training."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from quotopt.models import (
    RelationalConfig,
    RelationalTransformer,
    Transformer,
    TransformerConfig,
)
from quotopt.models.relational import alibi_bias

V, L = 13, 16  # vocabulary and max_len of the small test models


@pytest.fixture(autouse=True)
def _seed_and_one_thread():
    # These models are tiny: intra-op threads only add synchronisation, which on a loaded 2-core
    # machine made the training tests ~50x slower. Restore the setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


def small_transformer(**kw) -> Transformer:
    cfg = dict(vocab_size=V, d_model=12, n_layers=2, n_heads=3, max_len=L, d_head=5, d_mlp=20)
    return Transformer(**{**cfg, **kw})


def small_relational(**kw) -> RelationalTransformer:
    # d_gauge = 7 differs from every other size, so a shape containing 7 can only be gauge.
    cfg = dict(vocab_size=V, n_channels=5, d_gauge=7, n_layers=2, n_heads=2, max_len=L,
               d_head=3, d_mlp_channels=11)  # fmt: skip
    return RelationalTransformer(**{**cfg, **kw})


def tokens(B: int = 3, T: int = 9) -> torch.Tensor:
    return torch.randint(V, (B, T))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def random_orthogonal(n: int) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def random_gl(H: int, r: int, cond: float = 10.0) -> torch.Tensor:
    """Random (H, r, r) group elements with condition number `cond`."""
    u = torch.stack([random_orthogonal(r) for _ in range(H)])
    v = torch.stack([random_orthogonal(r) for _ in range(H)])
    s = torch.logspace(0, math.log10(cond), r, dtype=torch.float64)
    return u @ torch.diag_embed(s.expand(H, r)) @ v


def rotate_axis(t: torch.Tensor, axis: int, R: torch.Tensor) -> torch.Tensor:
    """T'[..., j, ...] = sum_i T[..., i, ...] R[i, j] along `axis` (docs/theory/bundles.md)."""
    return (t.movedim(axis, -1) @ R).movedim(-1, axis)


@torch.no_grad()
def apply_heads_gl(model: torch.nn.Module) -> None:
    """(Wq g, Wk g^-T) and (Wv h, h^-1 Wo) with independent random g, h per head and layer."""
    for block in model.blocks:
        a = block.attn
        H, _, r = a.wq.shape
        g, h = random_gl(H, r), random_gl(H, r)
        a.wq.copy_(a.wq @ g)
        a.wk.copy_(a.wk @ torch.linalg.inv(g).mT)
        a.wv.copy_(a.wv @ h)
        a.wo.copy_(torch.linalg.solve(h, a.wo))


# ---------------------------------------------------------------------------------- Transformer


def test_transformer_shapes_and_parameter_layout():
    m = small_transformer()
    x = tokens()
    assert m(x).shape == (3, 9, V)
    assert torch.allclose(m(x, last_only=True), m(x)[:, -1:], atol=1e-6)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes["blocks.0.attn.wq"] == (3, 12, 5)
    assert shapes["blocks.1.attn.wo"] == (3, 5, 12)
    assert shapes["blocks.0.mlp.w_in"] == (12, 20)
    assert shapes["blocks.0.mlp.w_out"] == (20, 12)
    assert shapes["tok_emb"] == (V, 12) and shapes["pos_emb"] == (L, 12)
    assert shapes["lm_head"] == (V, 12)
    tied = small_transformer(tie_embeddings=True)
    assert "lm_head" not in dict(tied.named_parameters()) and tied(x).shape == (3, 9, V)
    cls = small_transformer(n_classes=4)
    assert cls(x).shape == (3, 4) and "lm_head" not in dict(cls.named_parameters())


def test_transformer_config_roundtrip_and_defaults():
    cfg = TransformerConfig(vocab_size=V, d_model=16, n_layers=1, n_heads=4, max_len=L)
    m = Transformer.from_config(cfg)
    assert m.config.d_head == 4 and m.config.d_mlp == 64
    assert Transformer.from_config(m.config).config == m.config
    with pytest.raises(ValueError, match="divisible"):
        Transformer(V, 10, 1, 3, L)
    with pytest.raises(ValueError, match="activation"):
        Transformer(V, 12, 1, 3, L, activation="tanh")
    with pytest.raises(ValueError, match="n_layers"):
        Transformer(V, 12, 0, 3, L)


def test_transformer_init_scales():
    m = Transformer(V, 64, n_layers=8, n_heads=4, max_len=L)
    assert abs(m.tok_emb.std().item() - 0.02) < 2e-3
    assert abs(m.blocks[0].mlp.w_out.std().item() - 0.02 / 4) < 5e-4  # 1/sqrt(2 * 8)


@pytest.mark.parametrize("extra", [{}, {"tie_embeddings": True}, {"n_classes": 4},
                                   {"activation": "relu"}])  # fmt: skip
def test_transformer_exact_model_space_rotation(extra):
    m = small_transformer(**extra).double()
    x = tokens()
    before = m(x)
    R = random_orthogonal(12)
    axes = {"tok_emb": 1, "pos_emb": 1, "lm_head": 1, "cls_head": 1,
            "wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_in": 0, "w_out": 1}  # fmt: skip
    moved = []
    with torch.no_grad():
        for name, p in m.named_parameters():
            new = rotate_axis(p, axes[name.rsplit(".", 1)[-1]], R)
            moved.append(rel_err(new, p))
            p.copy_(new)
    assert min(moved) > 1e-2  # the representative really moved ...
    assert rel_err(m(x), before) < 1e-9  # ... and the function did not


def test_transformer_exact_head_gl():
    m = small_transformer().double()
    x = tokens()
    before = m(x)
    wq = m.blocks[0].attn.wq.clone()
    apply_heads_gl(m)
    assert rel_err(m.blocks[0].attn.wq, wq) > 1e-2
    assert rel_err(m(x), before) < 1e-9


def test_transformer_backward_and_bf16_autocast():
    m = small_transformer()
    x = tokens()
    loss = F.cross_entropy(m(x).flatten(0, 1), x.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.shape == (3, 9, V) and torch.isfinite(out.float()).all()


# ------------------------------------------------------------------------- RelationalTransformer


@pytest.mark.parametrize(
    "extra",
    [{}, {"positional": "gauge"}, {"n_classes": 4}, {"n_channels": 1, "d_head": 1},
     {"dressed": True}, {"dressed": True, "positional": "gauge"}],
)  # fmt: skip
def test_relational_logits_invariant_under_gauge_rotation(extra):
    m = small_relational(**extra).double()
    x = tokens()
    before = m(x)
    expected = (3, 4) if "n_classes" in extra else (3, 9, V)
    assert before.shape == expected
    R = random_orthogonal(7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "emb" in name:  # rotate every embedding vector by the same R
                new = rotate_axis(p, m.gauge_axis, R)
                assert rel_err(new, p) > 1e-2
                p.copy_(new)
    assert rel_err(m(x), before) < 1e-9


def test_relational_only_embeddings_carry_the_gauge_axis():
    for extra in ({}, {"positional": "gauge"}, {"n_classes": 4}):
        m = small_relational(**extra)
        for name, p in m.named_parameters():
            if "emb" in name:
                assert p.shape[m.gauge_axis] == 7 and p.shape.count(7) == 1, name
            else:
                assert 7 not in p.shape, f"{name} {tuple(p.shape)} touches the gauge axis"


def test_relational_attention_probabilities_are_gauge_invariant():
    m = small_relational().double()
    attn = m.blocks[0].attn
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64)  # (B, T, D, k) channels-last stream
    R = random_orthogonal(7)
    xr = R.T @ x  # every channel vector x ↦ x R (rows of X_i are gauge coordinates)
    bias = alibi_bias(m.alibi_slopes, 6)
    p = attn.probs(x, bias)
    assert p.shape == (2, 2, 6, 6)
    assert torch.allclose(p.sum(-1), torch.ones(2, 2, 6, dtype=torch.float64))
    assert torch.all(p.triu(1) == 0)  # causal
    assert rel_err(attn.probs(xr, bias), p) < 1e-12
    # the SDPA path equals the explicit one: y = Σ_h P_h V_h Wo_h
    _, _, v = attn.qkv(x)  # (B, H, T, D·r)
    ref = (p @ v).unflatten(-1, (7, 3)).permute(0, 2, 3, 1, 4).flatten(3) @ attn.wo.flatten(0, 1)
    assert rel_err(attn(x, bias=bias), ref) < 1e-12


def test_relational_exact_head_gl():
    m = small_relational().double()
    x = tokens()
    before = m(x)
    apply_heads_gl(m)
    assert rel_err(m(x), before) < 1e-9


def test_relational_uses_one_sdpa_call_per_layer(monkeypatch):
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting(q, k, v, **kw):
        calls.append(q.shape)
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    for positional in ("alibi", "gauge"):
        calls.clear()
        small_relational(positional=positional)(tokens())
        features = 3 * 7 + (2 if positional == "alibi" else 0)  # r·D (+ 2 ALiBi features)
        assert calls == [(3, 2, 9, features)] * 2  # (B, H, T, ·), one call per layer


def test_relational_dressed_reports_ambiguity():
    m = small_relational(dressed=True).double()
    assert m.last_ambiguity is None
    m(tokens())
    gap, sign = m.last_ambiguity["eig_gap"], m.last_ambiguity["sign_margin"]
    assert 0 < gap.item() <= 1 and 0 < sign.item() <= 1
    with torch.no_grad():  # an isotropic gauge second moment has no canonical eigenframe
        m.tok_emb.zero_()
        m.tok_emb[:7, 0].copy_(torch.eye(7, dtype=torch.float64))
    assert torch.isfinite(m(tokens())).all()
    assert m.last_ambiguity["eig_gap"].item() < 1e-12


def test_relational_backward_bf16_and_config():
    m = small_relational()
    x = tokens()
    loss = F.cross_entropy(m(x).flatten(0, 1), x.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, last_only=True)
    assert out.shape == (3, 1, V) and torch.isfinite(out.float()).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the frame is computed outside autocast
        assert torch.isfinite(small_relational(dressed=True)(x).float()).all()
    assert torch.allclose(m(x, last_only=True), m(x)[:, -1:], atol=1e-5)
    cfg = RelationalConfig(vocab_size=V, n_channels=8, d_gauge=4, n_layers=1, n_heads=2, max_len=L)
    r = RelationalTransformer.from_config(cfg)
    assert r.config.d_head == 4 and r.config.d_mlp_channels == 32
    with pytest.raises(ValueError, match="positional"):
        small_relational(positional="rope")


# -------------------------------------------------------------------------------- both models

MODELS = [small_transformer, small_relational]


@pytest.mark.parametrize("make", MODELS)
def test_bad_inputs_raise_informative_errors(make, monkeypatch):
    m = make()
    with pytest.raises(ValueError, match="integer dtype.*torch.float32"):
        m(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"2-D.*\(2, 3, 4\)"):
        m(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="17.*max_len 16"):
        m(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 13\).*min -1, max 13"):
        m(torch.tensor([[0, -1, 13]]))
    assert m(torch.zeros(1, 4, dtype=torch.int16)).shape[0] == 1  # any integer dtype is fine

    def no_sync(*args, **kwargs):
        raise AssertionError("strict_inputs=False must not read token ids back to the host")

    lazy = make(strict_inputs=False)
    monkeypatch.setattr(torch, "aminmax", no_sync)
    lazy(tokens())


def reverse_batch(B: int, n: int = 6, vocab: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """x = [s, SEP, reverse(s)]; the loss is scored on predicting the reversed half."""
    s = torch.randint(vocab, (B, n))
    seq = torch.cat([s, torch.full((B, 1), vocab), s.flip(1)], 1)  # (B, 2n+1), SEP = vocab
    return seq[:, :-1], seq[:, 1:]


@pytest.mark.parametrize(
    ("make", "lr", "bound"),
    [(lambda: Transformer(9, 32, n_layers=2, n_heads=4, max_len=16), 3e-3, 0.5),
     (lambda: RelationalTransformer(9, 16, 4, n_layers=2, n_heads=4, max_len=16), 1e-2, 0.75),
     (lambda: RelationalTransformer(9, 16, 4, n_layers=2, n_heads=4, max_len=16,
                                    positional="gauge"), 1e-2, 0.5)],
    ids=["transformer", "relational-alibi", "relational-gauge"],
)  # fmt: skip
def test_training_reduces_loss_on_reverse(make, lr, bound):
    # Reversal needs absolute positions: ALiBi (relative, decaying) learns it only partly in 60
    # steps (loss ratio ~0.6 over seeds), gauge-space positions fully (~0.01).
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(60):
        x, y = reverse_batch(32)
        logits = model(x)[:, 6:]  # predictions of the reversed half
        loss = F.cross_entropy(logits.flatten(0, 1), y[:, 6:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < bound * first, (first, last)
