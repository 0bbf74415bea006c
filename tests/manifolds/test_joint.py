"""The joint quotient by O(d) and the heads' GL(r) (manifolds.JointBundle, docs/theory/joint.md)."""

from __future__ import annotations

import pytest
import torch

import manifolds as M
from manifolds.joint import JointBundle
from manifolds.testing import assert_bundle, relative_error
from quotopt import QuotientAdam, QuotientSGD
from quotopt.groups import (
    gauge_transform,
    group_point,
    joint_groups,
    symmetries,
    verify,
    write_point,
)
from quotopt.models import Transformer

D = 6
# an embedding, two QK and two OV pairs (r = 2 and r = 3) and a stream-reading matrix
SHAPES = [(7, D), (2, D, 2), (2, D, 2), (2, D, 2), (2, 2, D), (D, 5), (1, D, 3), (1, D, 3)]
AXES = [1, 1, 1, 1, 2, 0, 1, 1]


def _bundle(metric="euclidean", solver="auto"):
    residual = M.ResidualRotation(D, AXES, shapes=SHAPES)
    heads = [
        (M.HeadQK(2, D, 2, metric), (1, 2)),
        (M.HeadOV(2, D, 2, metric), (3, 4)),
        (M.HeadQK(1, D, 3, metric), (6, 7)),
    ]
    return JointBundle(residual, heads, solver=solver)


def _point(bundle, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return bundle.random_point(generator=gen, dtype=torch.float64), gen


def _vertical_columns(bundle, point):
    """Every basis vertical vector, as a list of tangents (O(d) ones first, then the heads')."""
    basis = bundle.algebra_basis(dtype=torch.float64)
    return [bundle.vertical(point, tuple(b[k] for b in basis)) for k in range(bundle.group_dim)]


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
def test_conformance(metric, solver):
    """The generic bundle checks, float64, tolerance 1e-9."""
    assert_bundle(_bundle(metric, solver), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
def test_projection_is_orthogonal_to_every_vertical_vector(metric, solver):
    """Metric-orthogonal to each O(d) and each head vertical vector to 1e-10; idempotent; the
    vertical part reconstructs; dim V = d(d−1)/2 + Σ r²."""
    bundle = _bundle(metric, solver)
    point, gen = _point(bundle)
    v = bundle.random_tangent(point, generator=gen)
    h, vert = bundle.project_horizontal(point, v), bundle.project_vertical(point, v)
    columns = _vertical_columns(bundle, point)
    worst = max(
        float(bundle.inner(point, h, c).abs() / (bundle.norm(point, h) * bundle.norm(point, c)))
        for c in columns
    )
    assert worst <= 1e-10
    assert relative_error(bundle.project_horizontal(point, h), h) <= 1e-10
    assert relative_error(tuple(a + b for a, b in zip(h, vert)), v) <= 1e-12
    some = columns[0]  # an O(d) vector, plus a head vector: reconstructed exactly
    mixed = tuple(a + 2 * b for a, b in zip(some, columns[-1]))
    assert relative_error(bundle.project_vertical(point, mixed), mixed) <= 1e-10
    flat = torch.stack([torch.cat([t.reshape(-1) for t in c]) for c in columns], 1)
    assert int(torch.linalg.matrix_rank(flat)) == D * (D - 1) // 2 + 2 * 4 + 2 * 4 + 9
    assert bundle.group_dim == flat.shape[1]


def test_direct_and_cg_solvers_agree_and_cg_meets_its_tolerance():
    direct, cg = _bundle("invariant", "direct"), _bundle("invariant", "cg")
    point, gen = _point(direct, seed=4)
    v = direct.random_tangent(point, generator=gen)
    ref = direct.project_horizontal(point, v)
    assert relative_error(cg.project_horizontal(point, v), ref) <= 1e-10
    assert cg.last_solve["method"] == "cg"
    assert cg.last_solve["residual"] <= cg.last_solve["tol"] == 1e-13
    assert cg.last_solve["iterations"] <= D * (D - 1) // 2


def test_control_separate_projections_are_not_orthogonal():
    """Projecting out the heads, then O(d), leaves a component along the heads' orbits: the
    sum of vertical spaces needs the joint solve."""
    bundle = _bundle()
    point, gen = _point(bundle)
    v = bundle.random_tangent(point, generator=gen)
    out = list(v)
    for head, slots in bundle.heads:
        sub = head.project_horizontal(tuple(point[s] for s in slots), tuple(v[s] for s in slots))
        for s, t in zip(slots, sub):
            out[s] = t
    out = bundle.residual.project_horizontal(point, tuple(out))
    columns = _vertical_columns(bundle, point)[bundle.residual.group_dim :]
    worst = max(
        float(bundle.inner(point, out, c).abs() / (bundle.norm(point, out) * bundle.norm(point, c)))
        for c in columns
    )
    assert worst > 1e-3


def test_dressing_is_invariant_under_the_joint_group():
    bundle = _bundle()
    point, gen = _point(bundle)
    dressed = bundle.dress(point)
    for _ in range(10):
        g = bundle.random_group_element(generator=gen, dtype=torch.float64, condition=10.0)
        assert relative_error(bundle.dress(bundle.act(point, g)), dressed) <= 1e-9
    assert 0 < float(bundle.ambiguity(point)) <= 1
    # control: the O(d) dressing alone reads head factors, which GL(r) moves
    g = bundle.random_group_element(generator=gen, dtype=torch.float64)
    heads_only = (torch.eye(D, dtype=torch.float64), *g[1:])
    moved = bundle.act(point, heads_only)
    assert relative_error(bundle.residual.dress(moved), bundle.residual.dress(point)) > 1e-3


def test_construction_errors_name_the_problem():
    residual = M.ResidualRotation(D, AXES, shapes=SHAPES)
    with pytest.raises(ValueError, match="overlap"):
        JointBundle(residual, [(M.HeadQK(2, D, 2), (1, 2)), (M.HeadQK(2, D, 2), (2, 1))])
    with pytest.raises(ValueError, match="shapes"):
        JointBundle(residual, [(M.HeadQK(2, D, 2), (1, 4))])
    with pytest.raises(ValueError, match="share one metric"):
        JointBundle(
            residual,
            [(M.HeadQK(2, D, 2), (1, 2)), (M.HeadOV(2, D, 2, "invariant"), (3, 4))],
        )
    with pytest.raises(ValueError, match="solver"):
        JointBundle(residual, [], solver="lu")


# ---- on the Transformer ----------------------------------------------------------------------
def _model(seed=0):
    torch.manual_seed(seed)
    return Transformer(11, 8, 2, 2, 6, d_mlp=12).double()


@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
def test_verify_joint_group_on_transformer(metric):
    model = _model()
    groups = symmetries(model, residual=True, heads=True, metric=metric)
    assert [g["name"] for g in groups if "bundle" in g] == ["joint"]
    tokens = torch.randint(0, 11, (3, 6))
    changes = verify(model, groups, tokens, generator=torch.Generator().manual_seed(0), trials=3)
    assert changes["joint"] <= 1e-9
    bundle = groups[0]["bundle"]
    assert bundle.group_dim == 8 * 7 // 2 + 2 * 2 * (2 * 4**2)


def test_control_verify_fails_when_a_head_is_not_symmetric():
    """A fixed query bias breaks that pair's GL(r): the same check then fails."""
    model = _model()
    groups = joint_groups(model)
    attn = model.blocks[0].attn
    attn.q_bias = torch.randn(2, 4, dtype=torch.float64)
    tokens = torch.randint(0, 11, (3, 6))
    assert verify(model, groups, tokens, generator=torch.Generator().manual_seed(0))["joint"] > 1e-6


def _train(model, groups, steps, tokens, make):
    optimiser = make(groups)
    for _ in range(steps):
        optimiser.zero_grad()
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), tokens[:, 1:].reshape(-1))
        loss.backward()
        optimiser.step()
    return model(tokens[:, :-1])


def _orbit_gap(metric, groups_of, steps=150, make=lambda groups: QuotientAdam(groups, lr=1e-3)):
    """Train from p and from p·(R, g₁, …, g_n) (condition 10); relative gap of the logits (the
    model's invariants) and of the joint invariants after ``steps`` steps."""
    tokens = torch.randint(0, 11, (4, 6), generator=torch.Generator().manual_seed(1))
    a, b = _model(), _model()
    gauge_transform(b, joint_groups(b, metric), generator=torch.Generator().manual_seed(2))
    out_a = _train(a, groups_of(a), steps, tokens, make)
    out_b = _train(b, groups_of(b), steps, tokens, make)
    inv = joint_groups(a)[0]["bundle"].invariants
    point_a, point_b = (group_point(joint_groups(m)[0]) for m in (a, b))
    return max(relative_error(out_b, out_a), relative_error(inv(point_b), inv(point_a)))


@pytest.mark.parametrize("metric, dress_every", [("euclidean", 100), ("invariant", None)])
def test_quotient_adam_is_equivariant_under_the_joint_group(metric, dress_every):
    """Euclidean metric: by the joint dressing (both runs continue from one representative);
    invariant metric: by the geometry alone, without any dressing."""

    def adam(groups):
        return QuotientAdam(groups, lr=1e-3, dress_every=dress_every)

    assert _orbit_gap(metric, lambda m: joint_groups(m, metric), make=adam) <= 1e-6


def test_quotient_sgd_is_equivariant_under_the_joint_group():
    def sgd(groups):
        return QuotientSGD(groups, lr=1e-4, momentum=0.9, dress_every=None)

    assert _orbit_gap("invariant", lambda m: joint_groups(m, "invariant"), make=sgd) <= 1e-6


def test_control_without_the_rotation_part_is_not_equivariant():
    gap = _orbit_gap("invariant", lambda m: symmetries(m, residual=False, metric="invariant"))
    assert gap > 1e-3


# ---- LLaMA family: fold the RMSNorm gains, then the joint group -------------------------------
def _llama(seed=0):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=17, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture
def float64_rms_norm(monkeypatch):
    """HF's LlamaRMSNorm computes in float32 even on float64 inputs (round-off ≈ 1e-7 once the
    stream is rotated); the same map in the input's precision, for tight checks."""
    from transformers.models.llama import modeling_llama

    def forward(self, h):
        return (
            self.weight * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        )

    monkeypatch.setattr(modeling_llama.LlamaRMSNorm, "forward", forward)


def test_fold_rms_gains_leaves_the_logits_unchanged(float64_rms_norm):
    from quotopt.groups import fold_rms_gains

    model = _llama()
    tokens = torch.randint(0, 17, (2, 6))
    before = model(tokens, use_cache=False).logits.detach()
    fold_rms_gains(model)
    after = model(tokens, use_cache=False).logits.detach()
    assert relative_error(after, before) <= 1e-10
    assert model.lm_head.weight is not model.model.embed_tokens.weight  # untied
    assert all(not p.requires_grad for n, p in model.named_parameters() if "norm" in n)


def test_verify_joint_group_on_folded_llama(float64_rms_norm):
    from quotopt.groups import fold_rms_gains, llama_joint_groups

    model = fold_rms_gains(_llama())
    groups = symmetries(model, declared=llama_joint_groups(model))
    assert [g["name"] for g in groups if "bundle" in g] == ["joint"]
    tokens = torch.randint(0, 17, (2, 6))
    gen = torch.Generator().manual_seed(0)
    change = verify(model, groups, tokens, use_cache=False, generator=gen, trials=3)["joint"]
    assert change <= 1e-9
    assert groups[0]["bundle"].group_dim == 8 * 7 // 2 + 2 * 2 * 4**2  # O(8) + V/O GL(4) heads
    with torch.no_grad():  # control: a gain that is not folded breaks O(d)
        model.model.layers[0].input_layernorm.weight.copy_(torch.linspace(0.5, 1.5, 8))
    gen = torch.Generator().manual_seed(0)
    assert verify(model, groups, tokens, use_cache=False, generator=gen)["joint"] > 1e-6


def test_unfolded_gains_and_layernorm_models_are_refused():
    from quotopt.groups import llama_joint_groups

    with pytest.raises(ValueError, match="fold_rms_gains"):
        llama_joint_groups(_llama())
    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=8, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="LayerNorm.*O\\(d-1\\)"):
        llama_joint_groups(gpt2)


# ---- with a further rotation: the relational model's channels, heads and gauge ----------------
def _relational(**extra):
    from quotopt.models import RelationalTransformer

    torch.manual_seed(0)
    cfg = dict(n_channels=5, d_gauge=3, n_layers=2, n_heads=2, max_len=6, d_head=2)
    return RelationalTransformer(7, **{**cfg, "positional": "gauge", **extra}).double()


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
def test_joint_with_rotations_conformance_and_orthogonality(metric, solver):
    """The generic checks (1e-9) and horizontal ⟂ every O(k), head and O(D) vertical vector to
    1e-10; dim V = so(5) + 2·2·2·gl(2) + so(3) = 10 + 32 + 3 (compact 10 + 8 + 3)."""
    from manifolds.joint_rotations import JointWithRotations

    (group,) = [g for g in symmetries(_relational(), metric=metric) if "bundle" in g]
    b = group["bundle"]
    bundle = JointWithRotations(b.residual, b.heads, b.rotations, solver=solver)
    assert_bundle(bundle, generator=torch.Generator().manual_seed(3))
    assert (bundle.group_dim, bundle.compact_dim) == (45, 21)
    point, gen = _point(bundle)
    v = bundle.random_tangent(point, generator=gen)
    h = bundle.project_horizontal(point, v)
    columns = _vertical_columns(bundle, point)
    worst = max(
        float(bundle.inner(point, h, c).abs() / (bundle.norm(point, h) * bundle.norm(point, c)))
        for c in columns
    )
    assert worst <= 1e-10
    flat = torch.stack([torch.cat([t.reshape(-1) for t in c]) for c in columns], 1)
    assert int(torch.linalg.matrix_rank(flat)) == 45
    # control: the joint projection without the rotation leaves the gauge directions in
    plain = JointBundle(b.residual, b.heads, solver=solver).project_horizontal(point, v)
    gauge = columns[-b.rotations[0][0].group_dim :]
    assert max(float(bundle.inner(point, plain, c).abs()) for c in gauge) > 1e-3


def test_relational_joint_group_is_exact_and_trains():
    """verify ≤ 1e-9 (float64); control: the same group element without its action on the
    embedding table is no symmetry; QuotientAdam on the joint group lowers a next-token loss."""
    model = _relational()
    groups = symmetries(model)
    tokens = torch.randint(0, 7, (4, 6), generator=torch.Generator().manual_seed(1))
    assert verify(model, groups, tokens)["joint"] <= 1e-9
    (group,) = [g for g in groups if "bundle" in g]
    bundle, point = group["bundle"], tuple(t.detach().clone() for t in group_point(group))
    g = bundle.random_group_element(generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        before = model(tokens)
        moved = bundle.act(point, g)
        write_point(group, (point[0], *moved[1:]))  # tok_emb left where it was
        assert relative_error(model(tokens), before) > 1e-3
        write_point(group, moved)
        assert relative_error(model(tokens), before) <= 1e-9
    opt = QuotientAdam(groups, lr=1e-2)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        logits = model(tokens)[:, :-1].reshape(-1, 7)
        loss = torch.nn.functional.cross_entropy(logits, tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_relational_channel_rotation_refusals_name_the_reason():
    """n_classes and dressed models: "auto" leaves O(k) out (gauge + heads), True refuses."""
    for extra, reason in (({"n_classes": 3}, "cls_head"), ({"dressed": True}, "third moments")):
        model = _relational(**extra)
        names = [g["name"] for g in symmetries(model) if "bundle" in g]
        assert "joint" not in names and "gauge" in names
        with pytest.raises(ValueError, match=reason):
            model.symmetry_groups(channels=True)
    with pytest.raises(ValueError, match="channels must be"):
        _relational().symmetry_groups(channels="yes")
