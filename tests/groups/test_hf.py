"""RoPE heads (manifolds.rotary) and Hugging Face models (quotopt.groups.detectors.hf).

The RotaryQK tests need torch only; the model tests skip cleanly without ``transformers``. Models
are built from tiny configs with random weights, in float64. Hugging Face's RMSNorm computes in
float32 whatever the input dtype, which rounds a float64 symmetry's 1e-16 changes away (logits
come out bit-identical); ``exact_norms`` swaps in a float64-faithful forward so that the
symmetry checks see round-off, not float32 quantisation.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import manifolds as M
import quotopt
import quotopt.models
from manifolds.rotary import RotaryQK
from manifolds.testing import assert_bundle, relative_error
from quotopt.groups import Request, example_inputs, group_point
from quotopt.groups.checks import output_tensors
from quotopt.groups.detectors import hf as qhf
from quotopt.groups.layouts import ProjectionHeads, Rows, feature_blocks

F64 = torch.float64


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread (``conftest.one_thread``)."""


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- the bundle ---------------------------------------------------------------------------------
ROTARY_CASES = [
    (pairing, metric, rows)
    for pairing in ("half", "interleaved")
    for metric in M.METRICS
    for rows in (None, (12, 6))
]


@pytest.mark.parametrize(("pairing", "metric", "rows"), ROTARY_CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_rotary_conformance(pairing, metric, rows, seed):
    bundle = RotaryQK(3, 6, 4, metric, pairing=pairing, factor_rows=rows)
    assert_bundle(bundle, generator=_gen(seed), dtype=F64)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_rotary_conformance_float32(pairing):
    assert_bundle(
        RotaryQK(2, 8, 6, "invariant", pairing=pairing), generator=_gen(), dtype=torch.float32
    )


def _vertical_basis(bundle: RotaryQK, point):
    """V(E) for every basis element E (I or K in one plane of one head)."""
    basis = []
    for head in range(bundle.n_heads):
        for plane in range(bundle.n_pairs):
            for block in (
                torch.eye(2, dtype=F64),
                torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64),
            ):
                xi = torch.zeros(bundle.algebra_shape, dtype=F64)
                xi[head, plane] = block
                basis.append(bundle.vertical(point, xi))
    return basis


@pytest.mark.parametrize("metric", M.METRICS)
@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_vertical_projection_is_the_metric_least_squares_fit(metric, pairing):
    """The closed form (Euclidean) and the r×r system (invariant) against brute force."""
    bundle = RotaryQK(2, 7, 6, metric, pairing=pairing, factor_rows=(14, 7))
    gen = _gen(3)
    point = bundle.random_point(generator=gen, dtype=F64)
    z = bundle.random_tangent(point, generator=gen)
    basis = _vertical_basis(bundle, point)
    gram = torch.stack([torch.stack([bundle.inner(point, u, v) for v in basis]) for u in basis])
    rhs = torch.stack([bundle.inner(point, u, z) for u in basis])
    coef = torch.linalg.solve(gram, rhs)
    brute = tuple(sum(c * v[i] for c, v in zip(coef, basis)) for i in range(2))
    assert relative_error(bundle.project_vertical(point, z), brute) < 1e-12
    assert bundle.group_dim == len(basis) == torch.linalg.matrix_rank(gram)


@pytest.mark.parametrize("pairing", ["half", "interleaved"])
def test_action_is_the_headqk_action_of_its_matrix(pairing):
    bundle = RotaryQK(2, 6, 4, pairing=pairing)
    gen = _gen(4)
    point = bundle.random_point(generator=gen, dtype=F64)
    g = bundle.random_group_element(generator=gen, dtype=F64)
    full = bundle.matrix(g)
    assert relative_error(bundle.act(point, g), M.HeadQK(2, 6, 4).act(point, full)) < 1e-14
    assert torch.linalg.cond(full).max() == pytest.approx(10.0, rel=1e-9)


def _rotate_half_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Hugging Face LLaMA's RoPE, written out: x (T, r), angles (T, r/2)."""
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos + rotated * sin


def test_invariants_are_the_rope_score_forms():
    """Scores of RoPE'd queries and keys = Σᵢ x [cos(θᵢΔ) Mᵢ + sin(θᵢΔ) Nᵢ] yᵀ, and RoPE commutes
    with the action (scores unchanged) but not with a general GL(r) element."""
    bundle = RotaryQK(1, 8, 6, pairing="half")
    gen = _gen(5)
    a, b = bundle.random_point(generator=gen, dtype=F64)
    x = torch.randn(7, 8, generator=gen, dtype=F64)
    freq = 10000.0 ** (-torch.arange(0, 6, 2, dtype=F64) / 6)
    pos = torch.arange(7, dtype=F64)
    angles = pos[:, None] * freq  # (T, m)

    def scores(a, b):
        return _rotate_half_rope(x @ a[0], angles) @ _rotate_half_rope(x @ b[0], angles).T

    m_forms, n_forms = (t[0] for t in bundle.invariants((a, b)))  # (m, d, d)
    delta = angles[:, None, :] - angles[None, :, :]  # (T, T, m): θᵢ(p - p')
    forms = torch.einsum("pqi,ixy->pqxy", delta.cos(), m_forms) + torch.einsum(
        "pqi,ixy->pqxy", delta.sin(), n_forms
    )
    expected = torch.einsum("px,pqxy,qy->pq", x, forms, x)
    assert relative_error(scores(a, b), expected) < 1e-13
    g = bundle.random_group_element(generator=gen, dtype=F64)
    assert relative_error(scores(*bundle.act((a, b), g)), scores(a, b)) < 1e-13
    heads = M.HeadQK(1, 8, 6)
    general = heads.random_group_element(generator=gen, dtype=F64)
    assert relative_error(scores(*heads.act((a, b), general)), scores(a, b)) > 1e-2


def test_dressing_balances_and_fixes_the_phase():
    bundle = RotaryQK(2, 6, 4, pairing="half", factor_rows=(12, 6))
    gen = _gen(6)
    point = bundle.random_point(generator=gen, dtype=F64)
    a, b = bundle.dress(point)
    pa, pb = bundle._planes(a), bundle._planes(b)  # (H, rows, m, 2)
    norm_a, norm_b = pa.square().sum(dim=(1, 3)), pb.square().sum(dim=(1, 3))
    assert torch.allclose(norm_a, norm_b, rtol=1e-12)
    cross = (pa[..., 0] * pa[..., 1]).sum(1)  # the real columns of each plane are orthogonal
    assert cross.abs().max() < 1e-14
    assert (pa[..., 0].square().sum(1) >= pa[..., 1].square().sum(1)).all()
    gap = bundle.ambiguity(point)
    assert gap.shape == (2,) and (gap > 0).all() and (gap <= 1).all()


def test_dressing_rejects_a_vanishing_plane_and_reports_a_circular_one():
    bundle = RotaryQK(1, 4, 2, pairing="interleaved")
    a = torch.zeros(1, 4, 2, dtype=F64)
    b = torch.randn(1, 4, 2, dtype=F64)
    with pytest.raises(ValueError, match="plane 0 of head 0 of Wq vanishes"):
        bundle.dressing((a, b))
    a[0, 0, 0], a[0, 1, 1] = 1.0, 1.0  # equal singular values: the phase is not determined
    assert bundle.is_ambiguous((a, b)).all()


def test_rotary_rejects_odd_heads_and_unknown_pairings():
    with pytest.raises(ValueError, match="d_head must be even"):
        RotaryQK(1, 4, 3)
    with pytest.raises(ValueError, match="pairing must be one of"):
        RotaryQK(1, 4, 2, pairing="adjacent")


# ---- Hugging Face models ------------------------------------------------------------------------
VOCAB = 50


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


@pytest.fixture
def exact_norms(transformers, monkeypatch):
    """RMSNorm in the input's dtype (HF's upcasts to float32, hiding float64 round-off)."""

    def forward(self, hidden):
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))

    models = transformers.models
    for norm in (
        models.llama.modeling_llama.LlamaRMSNorm,
        models.mistral.modeling_mistral.MistralRMSNorm,
        models.qwen2.modeling_qwen2.Qwen2RMSNorm,
    ):
        monkeypatch.setattr(norm, "forward", forward)


def _gpt2(transformers):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB, n_positions=32,
        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():  # GPT-2 initialises biases to zero: make the folded rows count
        for module in model.modules():
            if type(module).__name__ == "Conv1D":
                module.bias.normal_(0.0, 0.02)
    return model


def _rotary(transformers, family="llama", **overrides):
    sizes = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    sizes.update(overrides)
    config_cls, model_cls = {
        "llama": ("LlamaConfig", "LlamaForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"),
        "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    }[family]
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**sizes))


MODELS = {
    "gpt2": lambda tf: _gpt2(tf),
    "llama-gqa": lambda tf: _rotary(tf),
    "llama-mha": lambda tf: _rotary(tf, num_key_value_heads=4),
    "llama-bias": lambda tf: _rotary(tf, attention_bias=True, mlp_bias=True),
    "mistral-mqa": lambda tf: _rotary(tf, "mistral", num_key_value_heads=1),
    "qwen2": lambda tf: _rotary(tf, "qwen2"),
}
OUTPUTS = dict(use_cache=False, return_dict=False)  # forward returns the tuple (logits,)


def _build(transformers, case, seed=0):
    torch.manual_seed(seed)
    model = MODELS[case](transformers).double().eval()
    return model, torch.randint(0, VOCAB, (2, 12), generator=_gen(seed))


@pytest.mark.parametrize("case", sorted(MODELS))
def test_every_group_is_an_exact_symmetry(transformers, exact_norms, case):
    model, ids = _build(transformers, case)
    groups = quotopt.symmetries(model)
    changes = quotopt.verify(model, groups, ids, generator=_gen(1), **OUTPUTS)
    assert len(changes) == (2 if case == "gpt2" else 6)
    assert max(changes.values()) <= 1e-12, changes
    with torch.no_grad():
        before = model(ids, **OUTPUTS)[0]
    moved = [g for g in groups if g.get("bundle") is not None]
    snapshot = [p.detach().clone() for g in moved for p in g["params"]]
    quotopt.gauge_transform(model, groups, generator=_gen(2))
    with torch.no_grad():
        after = model(ids, **OUTPUTS)[0]
    assert relative_error([p for g in moved for p in g["params"]], snapshot) >= 1e-2
    assert relative_error(after, before) <= 1e-12


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa"])
def test_verify_on_stock_models(transformers, case):
    """Without the float64 norm: still unchanged to 1e-9 (HF's float32 norms round to it)."""
    model, ids = _build(transformers, case)
    changes = quotopt.verify(model, quotopt.symmetries(model), ids, generator=_gen(1), **OUTPUTS)
    assert max(changes.values()) <= 1e-9


def test_gpt2_groups(transformers):
    """One ProductBundle group per layer holds c_attn (weight and bias) and c_proj.weight."""
    model, _ = _build(transformers, "gpt2")
    groups = quotopt.symmetries(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["name"] for g in groups] == [
        "transformer.h.0.attn.heads", "transformer.h.1.attn.heads", "plain",
    ]  # fmt: skip
    heads = groups[0]
    assert isinstance(heads["bundle"], M.ProductBundle)
    assert [names[id(p)] for p in heads["params"]] == [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_attn.bias",
        "transformer.h.0.attn.c_proj.weight",
    ]
    plain = {names[id(p)] for p in groups[-1]["params"]}
    assert "transformer.h.0.ln_1.weight" in plain and "transformer.h.0.mlp.c_fc.weight" in plain
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())


def test_gpt2_key_bias(transformers):
    """The key bias has no effect (zero gradient): the default layout leaves it alone, and
    folding it into W_k (``key_bias=True``) is an exact symmetry too."""
    model, ids = _build(transformers, "gpt2")
    model(ids, labels=ids, use_cache=False).loss.backward()
    e = model.config.n_embd
    for block in model.transformer.h:
        grad = block.attn.c_attn.bias.grad
        assert grad[e : 2 * e].abs().max() <= 1e-14 * grad.abs().max()
    groups = quotopt.symmetries(model)
    snapshot = [g["params"][1][e : 2 * e].detach().clone() for g in groups[:2]]
    quotopt.gauge_transform(model, groups, generator=_gen(3))
    assert all(torch.equal(g["params"][1][e : 2 * e], s) for g, s in zip(groups[:2], snapshot))
    folded = []
    for group in groups[:2]:
        h = model.config.n_head
        qk, ov = group["bundle"].components
        qk_folded = M.HeadQK(h, e + 1, e // h)  # factor rows (e + 1, e + 1)
        blocks = [feature_blocks(i * e, h, 1, e // h) for i in range(3)]  # q, k, v features
        specs = [Rows(0, b, bias=1, transposed=True) for b in blocks]  # Conv1D: (in, out)
        specs.append(Rows(2, feature_blocks(0, h, 1, e // h), writes=True))
        layout = ProjectionHeads(specs, "key bias folded into W_k")
        folded.append(dict(group, bundle=M.ProductBundle([qk_folded, ov]), layout=layout))
    changes = quotopt.verify(model, folded, ids, generator=_gen(4), **OUTPUTS)
    assert max(changes.values()) <= 1e-12


@pytest.mark.parametrize("case", ["llama-gqa", "llama-mha", "llama-bias"])
def test_llama_layouts_round_trip(transformers, case):
    """gather then scatter restores the parameters; without GQA or biases the points are views."""
    model, _ = _build(transformers, case)
    for group in quotopt.symmetries(model):
        layout = group.get("layout")
        if layout is None:
            continue
        saved = [p.detach().clone() for p in group["params"]]
        with torch.no_grad():
            point = group_point(group)
            group["bundle"].check_point(point)
            if layout.needs_scatter:
                for t in point:
                    t.mul_(2.0)
                layout.scatter(list(group["params"]), point)
                assert all(torch.equal(p, 2 * s) for p, s in zip(group["params"], saved))
            else:  # views: writing the point writes the parameters
                point[0].mul_(2.0)
                assert not torch.equal(group["params"][0], saved[0])


def test_full_gl_element_changes_llama(transformers, exact_norms):
    """RoPE's restriction is real: a GL(r) element outside the commutant changes the logits,
    one inside it does not."""
    model, ids = _build(transformers, "llama-gqa")
    groups = quotopt.symmetries(model)
    qk = groups[0]
    assert isinstance(qk["bundle"], RotaryQK)
    bundle = qk["bundle"]
    heads = M.HeadQK(bundle.n_heads, bundle.d_model, bundle.d_head, factor_rows=bundle.factor_rows)
    with torch.no_grad():
        before = model(ids, **OUTPUTS)[0]
        point = tuple(t.clone() for t in group_point(qk))  # B is a view of k_proj.weight
        general = heads.random_group_element(generator=_gen(7), dtype=F64)
        qk["layout"].scatter(list(qk["params"]), heads.act(point, general))
        changed = model(ids, **OUTPUTS)[0]
        qk["layout"].scatter(list(qk["params"]), point)
        inside = bundle.matrix(bundle.random_group_element(generator=_gen(8), dtype=F64))
        qk["layout"].scatter(list(qk["params"]), heads.act(point, inside))
        kept = model(ids, **OUTPUTS)[0]
    assert relative_error(changed, before) > 1e-3
    assert relative_error(kept, before) < 1e-12


def test_llama_residual_rotation_with_conjugated_gains(transformers, exact_norms):
    """The claim of quotopt.groups.detectors.hf's docstring: RMSNorm gains do not remove O(d);
    x ↦ xR with W ↦ W·D R D⁻¹ on the weights reading a norm (D = diag of its gains) is exact."""
    model, ids = _build(transformers, "llama-gqa")
    d = model.config.hidden_size
    rotation = M.ResidualRotation(d, [0]).random_group_element(generator=_gen(9), dtype=F64)
    gen = _gen(10)
    with torch.no_grad():
        for norm in [m for n, m in model.named_modules() if n.endswith("norm")]:
            norm.weight.copy_(0.5 + torch.rand(d, generator=gen, dtype=F64))
        before = model(ids, **OUTPUTS)[0]

        def read(linear, gains):  # nn.Linear (out, in) reading D-scaled normalised input
            linear.weight.copy_(linear.weight * gains @ rotation / gains)

        model.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight @ rotation)
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for linear in (attn.q_proj, attn.k_proj, attn.v_proj):
                read(linear, layer.input_layernorm.weight)
            for linear in (mlp.gate_proj, mlp.up_proj):
                read(linear, layer.post_attention_layernorm.weight)
            for linear in (attn.o_proj, mlp.down_proj):  # written into the stream
                linear.weight.copy_(rotation.T @ linear.weight)
        read(model.lm_head, model.model.norm.weight)
        after = model(ids, **OUTPUTS)[0]
    assert relative_error(after, before) < 1e-12


@pytest.mark.parametrize(
    ("case", "metric", "lr"),
    [
        ("gpt2", "euclidean", 1e-2),
        ("gpt2", "invariant", 1e-3),
        ("llama-gqa", "euclidean", 1e-2),
        ("llama-gqa", "invariant", 1e-3),
    ],
)
def test_quotient_adam_trains(transformers, case, metric, lr):
    model, _ = _build(transformers, case)
    ids = torch.randint(0, VOCAB, (4, 16), generator=_gen(11))
    optimiser = quotopt.QuotientAdam(quotopt.symmetries(model, metric=metric), lr=lr)
    losses = []
    for _ in range(12):
        loss = model(ids, labels=ids, use_cache=False).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.9 * losses[0]


def test_detectors_ignore_other_modules(transformers):
    """The hook functions return nothing for modules they do not know."""
    model = quotopt.models.Transformer(11, 8, 1, 2, 8)
    for prefix, module in model.named_modules():
        assert qhf.hf_slots(prefix, module, Request()) == []


# ---- the families, by structure ---------------------------------------------------------
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             vocab_size=VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0)  # fmt: skip
ENC_DEC = dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
               vocab_size=VOCAB, pad_token_id=0, bos_token_id=0, eos_token_id=0,
               decoder_start_token_id=0)  # fmt: skip
GPT = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0)
#: family: (config class, model class, config, {bundle type: number of groups}); a family whose
#: symmetry is partial lists the subgroup it gets (partial rotary, Phi and GPT-NeoX: RoPE's
#: commutant on the rotated coordinates x GL on the rest; Qwen3: QK-norm gains leave Q/K plain;
#: GELU MLPs: no units).
FAMILIES = {
    "bert": ("BertConfig", "BertModel", SMALL, {"HeadQK": 2, "HeadOV": 2}),
    "roberta": ("RobertaConfig", "RobertaModel", dict(SMALL, pad_token_id=1),
                {"HeadQK": 2, "HeadOV": 2}),
    "distilbert": ("DistilBertConfig", "DistilBertModel",
                   dict(dim=32, n_layers=2, n_heads=4, hidden_dim=64, vocab_size=VOCAB),
                   {"HeadQK": 2, "HeadOV": 2}),
    "vit": ("ViTConfig", "ViTModel", dict(SMALL, image_size=8, patch_size=4),
            {"HeadQK": 2, "HeadOV": 2}),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(SMALL, ffn_dim=64, word_embed_proj_dim=32),
            {"HeadQK": 2, "HeadOV": 2, "PositiveRescaling": 2}),
    "bart": ("BartConfig", "BartModel", ENC_DEC, {"HeadQK": 3, "HeadOV": 3}),
    "t5": ("T5Config", "T5Model", dict(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
           vocab_size=VOCAB, decoder_start_token_id=0),
           {"HeadQK": 3, "HeadOV": 3, "PositiveRescaling": 2}),
    "whisper": ("WhisperConfig", "WhisperModel",
                dict(ENC_DEC, num_mel_bins=8, max_source_positions=8),
                {"HeadQK": 3, "HeadOV": 3}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(SMALL, head_dim=8, num_key_value_heads=2),
              {"RotaryQK": 2, "HeadOV": 2, "PositiveRescaling": 2}),
    "phi": ("PhiConfig", "PhiForCausalLM", SMALL, {"RotaryQK x HeadQK": 2, "HeadOV": 2}),
    "gpt-neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", SMALL,
                 {"RotaryQK x HeadQK x HeadOV": 2}),
    "falcon": ("FalconConfig", "FalconForCausalLM", SMALL, {"RotaryQK x HeadOV": 2}),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(hidden_size=32, n_layer=2, n_head=4,
              vocab_size=VOCAB), {"HeadQK x HeadOV": 2}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(SMALL, num_key_value_heads=2),
             {"RotaryQK x HeadOV": 2, "PositiveRescaling": 2}),
    "gpt-bigcode": ("GPTBigCodeConfig", "GPTBigCodeForCausalLM", GPT, {"HeadQK x HeadOV": 2}),
    "codegen": ("CodeGenConfig", "CodeGenForCausalLM", dict(GPT, rotary_dim=8),
                {"RotaryQK x HeadOV": 2}),
    "gpt-j": ("GPTJConfig", "GPTJForCausalLM", dict(GPT, rotary_dim=8),
              {"RotaryQK": 2, "HeadOV": 2}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(SMALL, num_key_value_heads=2, num_local_experts=4,
                     experts_implementation="eager"),
                {"RotaryQK": 2, "HeadOV": 2, "PositiveRescaling": 2}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(SMALL, num_key_value_heads=2, head_dim=8),
              {"HeadOV": 2, "PositiveRescaling": 2}),
    "qwen1.5-bias-mha": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=4),
                         {"RotaryQK": 2, "HeadOV": 2, "PositiveRescaling": 2}),
    "qwen2-bias-gqa": ("Qwen2Config", "Qwen2ForCausalLM", dict(SMALL, num_key_value_heads=2),
                       {"RotaryQK": 2, "HeadOV": 2, "PositiveRescaling": 2}),
    "llama-bias-gqa": ("LlamaConfig", "LlamaForCausalLM",
                       dict(SMALL, num_key_value_heads=2, attention_bias=True),
                       {"RotaryQK": 2, "HeadOV": 2, "PositiveRescaling": 2}),
    "llama-bias-mha": ("LlamaConfig", "LlamaForCausalLM",
                       dict(SMALL, num_key_value_heads=4, attention_bias=True),
                       {"RotaryQK": 2, "HeadOV": 2, "PositiveRescaling": 2}),
}  # fmt: skip


def _family(transformers, name, dtype=F64):
    config_cls, model_cls, kwargs, _ = FAMILIES[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**kwargs)
    return getattr(transformers, model_cls)(config).to(dtype).eval()


def _bundle_counts(groups) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in groups:
        bundle = group.get("bundle")
        if bundle is not None:
            parts = getattr(bundle, "components", None) or [bundle]
            key = " x ".join(type(c).__name__ for c in parts)
            counts[key] = counts.get(key, 0) + 1
    return counts


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_groups_verify(transformers, name):
    """The groups found, and verify ≤ 1e-9 on the float64 model with every touched module's
    parameters randomised (HF's float32 RMSNorm rounds some changes to exactly 0: the rejected
    candidates in the report are the control that fails)."""
    model = _family(transformers, name)
    groups, report = quotopt.symmetries(model, report=True)
    assert _bundle_counts(groups) == FAMILIES[name][3], str(report)
    args, kwargs = example_inputs(model)
    changes = quotopt.verify(model, groups, *args, generator=_gen(1), **kwargs)
    assert max(changes.values()) <= 1e-9, changes
    assert changes.randomised and changes.compared


@pytest.mark.parametrize(
    ("name", "metric"),
    [(n, m) for n in sorted(FAMILIES) for m in M.METRICS],
)
def test_family_trains(transformers, name, metric):
    """30 QuotientAdam steps on a regression of the first output tensor: no error, loss falls."""
    model = _family(transformers, name, torch.float32)
    groups = quotopt.symmetries(model, metric=metric)
    args, kwargs = example_inputs(model)
    with torch.no_grad():
        target = torch.randn_like(output_tensors(model(*args, **kwargs))[0][1])
    optimiser = quotopt.QuotientAdam(groups, lr=3e-3 if metric == "euclidean" else 1e-3)
    frozen = [(p, p.detach().clone()) for g in groups if g.get("lr") == 0.0 for p in g["params"]]
    assert all(g["name"].endswith("k_proj.bias") or "key" in g["name"] or "k_lin" in g["name"]
               for g in groups if g.get("lr") == 0.0)  # fmt: skip
    losses = []
    for _ in range(30):
        out = output_tensors(model(*args, **kwargs))[0][1]
        loss = (out - target).square().mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < 0.95 * losses[0], losses
    assert all(torch.equal(p, before) for p, before in frozen)  # key biases never move


def test_rope_families_reject_full_gl(transformers):
    """The control beside the RoPE groups: full GL(r) is proposed first and fails the check."""
    for name, bundle, structure in [
        ("gemma", "RotaryQK", "RoPE commutant (half)"),
        ("phi", "RotaryQK x HeadQK", "partial RoPE commutant (half on 4 of 8) x GL(4)"),
    ]:
        _, report = quotopt.symmetries(_family(transformers, name), report=True)
        qk = [f for f in report.findings if f.part == "qk"]
        assert qk and all(f.bundle == bundle and structure in f.structure for f in qk)
        assert all(f.tried and f.tried[0].startswith("GL(r) per head: change") for f in qk)
        assert all(float(f.tried[0].rsplit(" ", 1)[1]) > 1e-4 for f in qk)


def combinations_table(transformers) -> str:
    """The table of ``docs/guides/combinations.md``, from detection on the tiny configs."""
    rows = ["| family | groups found (bundle × count) | not reduced, and why |", "|---|---|---|"]
    for name in sorted(FAMILIES):
        model = _family(transformers, name, torch.float32)
        groups, report = quotopt.symmetries(model, report=True)
        found = ", ".join(f"`{k}` × {v}" for k, v in sorted(_bundle_counts(groups).items()))
        why = []
        for finding in report.findings:
            note = finding.note.split(" (tried")[0]
            if finding.source == "frozen":
                note = "key bias: frozen (softmax shift)"
            if note and not finding.bundle and note not in why:
                why.append(note)
        rows.append(f"| {name} | {found} | {'; '.join(why) or '-'} |")
    return "\n".join(rows)


def test_combinations_page_matches_detection(transformers):
    page = (Path(__file__).resolve().parents[2] / "docs/guides/combinations.md").read_text()
    table = combinations_table(transformers)
    assert table in page, f"docs/guides/combinations.md is out of date; the table is:\n{table}"
