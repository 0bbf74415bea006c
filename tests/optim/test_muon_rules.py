"""QuotientMuon's plain groups by rule: ``"adamw"`` groups are torch.optim.AdamW bit for bit and
``"muon"`` groups torch.optim.Muon, in one optimiser; the default rules; a whole Transformer
trained by one QuotientMuon; the refusals, each leaving the optimiser as it was; state_dict
resume and the refusal of a state saved under the other rule; the commit guard on adamw
groups; the documentation's example."""

from __future__ import annotations

import copy
import io
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import manifolds as M
from quotopt import NonFiniteStepError, QuotientMuon, symmetries
from quotopt.models import Transformer

ROOT = Path(__file__).resolve().parents[2]
ADAMW = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6)
SHAPES = [(5, 3), (4,), (2, 3, 4), (6, 6)]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny problems: one intra-op thread (``conftest.one_thread``)."""


def _params(shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _loss(params, weights):
    return sum(
        torch.log1p((p.float() - w) ** 2).sum() + p.float().sin().sum()
        for p, w in zip(params, weights)
    )


def _run(runs, steps, seed=3):
    """Step each (optimisers, params) pair on the same sequence of losses."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [p.shape for p in runs[0][1]]
    for _ in range(steps):
        weights = [torch.randn(s, generator=gen) for s in shapes]
        for optimisers, params in runs:
            for opt in optimisers:
                opt.zero_grad()
            _loss(params, weights).backward()
            for opt in optimisers:
                opt.step()


def _equal(a, b) -> bool:
    """Tensors, or tuples of tensors (a bundle group's state), equal bit for bit."""
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(map(_equal, a, b))
    return torch.equal(a, b)


def _clone(v):
    return tuple(map(_clone, v)) if isinstance(v, tuple) else v.clone()


def _state_equal(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(_equal(a[k], b[k]) for k in a)


# ---- the rules are torch's optimisers --------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("as_keys", [False, True], ids=["constructor", "group-keys"])
def test_adamw_rule_matches_torch_adamw_bitwise(dtype, weight_decay, as_keys):
    ours, theirs = _params(SHAPES, dtype), _params(SHAPES, dtype)
    adamw = dict(
        adamw_lr=ADAMW["lr"], adamw_betas=ADAMW["betas"], adamw_eps=ADAMW["eps"],
        adamw_weight_decay=weight_decay,
    )  # fmt: skip
    if as_keys:  # per-group keys, the constructor's defaults elsewhere
        opt = QuotientMuon([{"params": ours, "rule": "adamw", **adamw}])
    else:
        opt = QuotientMuon([{"params": ours, "rule": "adamw"}], **adamw)
    reference = torch.optim.AdamW(theirs, **ADAMW, weight_decay=weight_decay)
    _run([([opt], ours), ([reference], theirs)], steps=12)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    for a, b in zip(ours, theirs):
        mine, torchs = opt.state[a], reference.state[b]
        assert set(mine) == set(torchs) == {"step", "exp_avg", "exp_avg_sq"}
        assert torch.equal(mine["exp_avg"], torchs["exp_avg"])
        assert torch.equal(mine["exp_avg_sq"], torchs["exp_avg_sq"])
        assert mine["step"].item() == torchs["step"].item() == 12


def test_adamw_rule_maximize_matches_torch():
    ours, theirs = _params(SHAPES, torch.float32), _params(SHAPES, torch.float32)
    opt = QuotientMuon(
        [{"params": ours, "rule": "adamw"}], maximize=True, adamw_lr=1e-2, adamw_weight_decay=0.1
    )
    reference = torch.optim.AdamW(
        theirs, lr=1e-2, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.1, maximize=True
    )
    _run([([opt], ours), ([reference], theirs)], steps=5)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_optimiser_is_torch_muon_beside_torch_adamw(dtype):
    """A 2-D group (rule "muon" by default) and a group with 1-D and 3-D tensors (rule "adamw"
    by default) in one QuotientMuon: bit for bit torch.optim.Muon and torch.optim.AdamW."""
    mats, rest = [(5, 3), (6, 6), (3, 7)], [(4,), (2, 3, 4)]
    ours, theirs = _params(mats + rest, dtype), _params(mats + rest, dtype)
    opt = QuotientMuon(
        [{"params": ours[:3], "name": "hidden"}, {"params": ours[3:], "name": "gains"}],
        lr=0.02, weight_decay=0.1, adamw_lr=1e-2, adamw_weight_decay=0.01,
    )  # fmt: skip
    assert [g["rule"] for g in opt.param_groups] == ["muon", "adamw"]
    pair = [
        torch.optim.Muon(theirs[:3], lr=0.02, weight_decay=0.1),
        torch.optim.AdamW(theirs[3:], lr=1e-2, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.01),
    ]
    _run([([opt], ours), (pair, theirs)], steps=8)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    for a, b in zip(ours[:3], theirs[:3]):
        assert torch.equal(opt.state[a]["momentum_buffer"], pair[0].state[b]["momentum_buffer"])


def test_default_rules_and_learning_rates():
    gen = torch.Generator().manual_seed(0)
    bundle = M.HeadQK(2, 5, 2)
    heads = [torch.nn.Parameter(t) for t in bundle.random_point(generator=gen)]
    mats = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3, 3))]
    mixed = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    embed = torch.nn.Parameter(torch.randn(7, 3))
    opt = QuotientMuon(
        [
            {"params": heads, "bundle": bundle},
            {"params": mats},
            {"params": mixed},
            {"params": [embed], "rule": "adamw", "adamw_lr": 5e-3},
            {"params": [torch.nn.Parameter(torch.randn(2))], "lr": 1e-1},
        ],
        lr=0.02,
        adamw_lr=1e-3,
    )
    rules = [g["rule"] for g in opt.param_groups]
    assert rules == ["muon", "muon", "adamw", "adamw", "adamw"]
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.02, 1e-3, 5e-3, 1e-1]
    assert all("adamw_lr" not in g for g in opt.param_groups)  # an adamw group's lr is "lr"
    assert opt.param_groups[2]["adamw_betas"] == (0.9, 0.95)
    assert opt.param_groups[2]["adamw_eps"] == 1e-10
    assert opt.param_groups[2]["adamw_weight_decay"] == 0.0


# ---- a whole model by one optimiser ----------------------------------------------------------


def _transformer_groups(model):
    """``quotopt.symmetries``' bundle groups; its plain group split into the hidden matrices
    (Muon) and the embeddings and read-out (marked AdamW)."""
    found = symmetries(model)
    edges = {id(p) for p in (model.tok_emb, model.pos_emb, model.lm_head)}
    rest = [p for g in found if g.get("bundle") is None for p in g["params"]]
    groups = [g for g in found if g.get("bundle") is not None]
    hidden = [p for p in rest if id(p) not in edges]  # none where the MLP units are a bundle
    assert groups
    return groups + [
        *([{"params": hidden, "name": "hidden"}] if hidden else []),
        {"params": [p for p in rest if id(p) in edges], "name": "edges", "rule": "adamw"},
    ]


@pytest.mark.parametrize("activation", ["gelu", "relu"])  # relu: rescaled MLP units, a bundle
def test_one_quotient_muon_trains_a_whole_transformer(activation):
    torch.manual_seed(0)
    model = Transformer(
        vocab_size=13, d_model=16, n_layers=2, n_heads=2, d_mlp=32, max_len=8,
        activation=activation,
    )  # fmt: skip
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = QuotientMuon(_transformer_groups(model), lr=0.02, adamw_lr=3e-3)
    covered = [p for g in opt.param_groups for p in g["params"]]
    assert sorted(map(id, covered)) == sorted(id(p) for p in model.parameters())
    tokens = torch.randint(0, 13, (8, 8), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), start[name]), f"{name} did not move"
    edges = opt.param_groups[-1]
    assert edges["name"] == "edges" and edges["rule"] == "adamw"
    assert all(set(opt.state[p]) == {"step", "exp_avg", "exp_avg_sq"} for p in edges["params"])
    names = [g["name"] for g in opt.param_groups]
    assert ("hidden" in names) == (activation == "gelu")  # relu: the MLP is rescaling bundles
    for group in opt.param_groups[:-1]:  # Muon's state, on the quotient or not (head pairs:
        # with the frame bases the next step's frames are built from)
        bases = {"frame_basis"} if group.get("bundle") is not None else set()
        for p in group["params"][:1]:
            assert set(opt.state[p]) - bases == {"momentum_buffer"}


# ---- refusals: named, and nothing changed ---------------------------------------------------


def _snapshot(opt):
    structure = ("params", "bundle", "layout")  # compared by identity
    groups = [{k: v for k, v in g.items() if k not in structure} for g in opt.param_groups]
    groups += [[id(g.get(k)) for k in structure[1:]] for g in opt.param_groups]
    params = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
    state = {id(p): {k: _clone(v) for k, v in s.items()} for p, s in opt.state.items()}
    return copy.deepcopy(groups), params, state


def _unchanged(opt, snapshot) -> bool:
    groups, params, state = _snapshot(opt)
    same_groups = groups == snapshot[0]
    same_params = all(
        len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
        for a, b in zip(params, snapshot[1])
    ) and len(params) == len(snapshot[1])
    same_state = state.keys() == snapshot[2].keys() and all(
        _state_equal(state[k], snapshot[2][k]) for k in state
    )
    return same_groups and same_params and same_state


def _stepped():
    """A QuotientMuon with a muon and an adamw group, after one step."""
    mats, vecs = _params([(4, 3)], torch.float32), _params([(3,)], torch.float32, seed=1)
    opt = QuotientMuon([{"params": mats, "name": "hidden"}, {"params": vecs, "name": "gains"}])
    _loss(mats + vecs, [torch.zeros(4, 3), torch.zeros(3)]).backward()
    opt.step()
    return opt, mats + vecs


def _bundle_group(name="heads"):
    bundle = M.HeadQK(2, 5, 2)
    point = bundle.random_point(generator=torch.Generator().manual_seed(2))
    return {"params": [torch.nn.Parameter(t) for t in point], "bundle": bundle, "name": name}


def _group(*shapes, **keys) -> dict:
    return {"params": _params(shapes, torch.float32), "name": "g", **keys}


MIXED = r"mixed: rule 'muon' .* params\[1\] has shape \(3,\).*AdamW.*rule 'adamw'"
REFUSALS = {
    "mixed group, rule muon": (
        lambda: _group((2, 2), (3,), rule="muon", name="mixed"),
        MIXED,
    ),
    "bundle group, rule adamw": (
        lambda: dict(_bundle_group("heads"), rule="adamw"),
        r"heads: Invalid rule: 'adamw' for a bundle group.*orthogonalises",
    ),
    "unknown rule": (
        lambda: _group((2, 2), rule="sgd"),
        r"g: Invalid rule: 'sgd' \(expected one of \('muon', 'adamw'\)\)",
    ),
    "adamw_betas at 1": (
        lambda: _group((3,), adamw_betas=(0.9, 1.0)),
        r"g: Invalid adamw_betas\[1\]: 1.0 \(expected 0 <= adamw_betas\[1\] < 1\)",
    ),
    "adamw_betas not a pair": (
        lambda: _group((3,), adamw_betas=(0.9,)),
        r"g: Invalid adamw_betas: \(0.9,\) \(expected a pair\)",
    ),
    "negative adamw_eps": (
        lambda: _group((3,), adamw_eps=-1e-8),
        r"g: Invalid adamw_eps: -1e-08 \(expected adamw_eps >= 0\)",
    ),
    "nan adamw_weight_decay": (
        lambda: _group((3,), adamw_weight_decay=float("nan")),
        r"g: Invalid adamw_weight_decay: nan \(expected a finite number >= 0\)",
    ),
    "negative adamw_lr": (
        lambda: _group((3,), adamw_lr=-1.0),
        r"g: Invalid learning rate: -1.0 \(expected learning rate >= 0\)",
    ),
    "adamw decay too large": (
        lambda: _group((3,), lr=1.0, adamw_weight_decay=2.0),
        r"g: Invalid lr·weight_decay",
    ),
    "adamw key on a muon group": (
        lambda: _group((7, 3), adamw_lr=1e-3, name="embed"),
        r"embed: \['adamw_lr'\] set the AdamW rule's hyperparameters, but this group's rule is "
        r"'muon'; add \{'rule': 'adamw'\} to the group",
    ),
    "muon key on an adamw group": (
        lambda: _group((3,), weight_decay=0.01),
        r"g: 'weight_decay' is a Muon hyperparameter, unused by this group's rule 'adamw'; set "
        r"'adamw_weight_decay' instead",
    ),
    "lr and adamw_lr": (
        lambda: _group((3,), lr=1e-3, adamw_lr=1e-3),
        r"g: both 'lr' and 'adamw_lr' are set",
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_group_and_change_nothing(case):
    make, message = REFUSALS[case]
    with pytest.raises(ValueError, match=message):  # at construction
        QuotientMuon([make()])
    opt, _ = _stepped()  # and added to an optimiser that has stepped: it stays as it was
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.add_param_group(make())
    assert _unchanged(opt, before)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(adamw_betas=(1.5, 0.9)), r"Invalid adamw_betas\[0\]: 1.5"),
        (dict(adamw_eps=float("inf")), r"Invalid adamw_eps: inf"),
        (dict(adamw_weight_decay=-0.1), r"Invalid adamw_weight_decay: -0.1"),
        (dict(adamw_lr=float("nan")), r"QuotientMuon: Invalid adamw_lr: nan"),
    ],
)
def test_bad_constructor_defaults_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuotientMuon(_params([(3,), (2, 2)], torch.float32), **kwargs)


def test_changes_between_steps_are_refused_before_anything_is_written():
    """A group's AdamW value made invalid, a rule made to disagree with the group's tensors or
    with its state: the next step raises, naming the group, and writes nothing."""
    changes = [
        ("gains", "adamw_eps", -1.0, r"gains: Invalid adamw_eps: -1.0"),
        ("gains", "rule", "muon", r"gains: rule 'muon' .*params\[0\] has shape \(3,\)"),
        ("hidden", "rule", "adamw", r"hidden: rule is 'adamw' but params\[0\] holds the state"),
        ("hidden", "rule", "lion", r"hidden: Invalid rule: 'lion'"),
    ]
    for name, key, value, message in changes:
        opt, params = _stepped()
        _loss(params, [torch.ones(4, 3), torch.ones(3)]).backward()
        group = next(g for g in opt.param_groups if g["name"] == name)
        group[key] = value
        before = _snapshot(opt)
        with pytest.raises(ValueError, match=message):
            opt.step()
        assert _unchanged(opt, before)


# ---- state_dict ------------------------------------------------------------------------------


def _problem(seed=0):
    """A head bundle group, a 2-D muon group, a mixed adamw group, one coupled loss."""
    gen = torch.Generator().manual_seed(seed)
    bundle = M.HeadQK(2, 5, 2)
    heads = [torch.nn.Parameter(t) for t in bundle.random_point(generator=gen)]
    mats = [torch.nn.Parameter(torch.randn(5, 4, generator=gen))]
    rest = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((5,), (3, 4))]
    target = torch.randn(2, 5, 5, generator=gen)
    groups = [
        {"params": heads, "bundle": bundle, "name": "heads"},
        {"params": mats, "name": "hidden"},
        {"params": rest, "name": "gains", "adamw_weight_decay": 0.01},
    ]

    def loss():
        m = bundle.invariants(heads)[0]
        x = (m.sum(0) @ mats[0]).tanh() * rest[0][:, None]
        return ((m - target) ** 2).mean() + (x @ rest[1].T).square().mean() + rest[1].sin().sum()

    return groups, loss, heads + mats + rest


def _train(opt, loss, steps):
    for _ in range(steps):
        opt.zero_grad()
        loss().backward()
        opt.step()


def test_state_dict_round_trip_resumes_bit_for_bit():
    groups, loss, params = _problem()
    opt = QuotientMuon(groups, lr=1e-2, adamw_lr=1e-2)
    _train(opt, loss, 4)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    _train(opt, loss, 5)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert [g["rule"] for g in saved["opt"]["param_groups"]] == ["muon", "muon", "adamw"]
    groups2, loss2, params2 = _problem()
    with torch.no_grad():
        for p, s in zip(params2, saved["params"]):
            p.copy_(s)
    opt2 = QuotientMuon(groups2, lr=1e-2, adamw_lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    assert [g["rule"] for g in opt2.param_groups] == ["muon", "muon", "adamw"]
    _train(opt2, loss2, 5)
    assert all(torch.equal(a.detach(), b.detach()) for a, b in zip(params, params2))
    for a, b in zip(params[2:], params2[2:]):
        assert _state_equal(opt.state[a], opt2.state[b])


def test_state_saved_before_plain_groups_had_rules_loads():
    """A state_dict without "rule" (saved by QuotientMuon before rules) holds muon groups."""
    groups, loss, _ = _problem()
    groups = groups[:2]
    opt = QuotientMuon(groups, lr=1e-2)
    _train(opt, loss, 2)
    state = opt.state_dict()
    for group in state["param_groups"]:
        for key in ("rule", "adamw_betas", "adamw_eps", "adamw_weight_decay"):
            del group[key]
    opt.load_state_dict(state)
    assert [g["rule"] for g in opt.param_groups] == ["muon", "muon"]
    _train(opt, loss, 1)


@pytest.mark.parametrize("stepped", [True, False], ids=["with-state", "before-any-step"])
def test_state_saved_under_the_other_rule_is_refused(stepped):
    weight = torch.nn.Parameter(torch.randn(6, 4))
    as_adamw = QuotientMuon([{"params": [weight], "rule": "adamw", "name": "embed"}])
    if stepped:
        weight.sum().backward()
        as_adamw.step()
    saved = as_adamw.state_dict()
    other = torch.nn.Parameter(weight.detach().clone())
    as_muon = QuotientMuon([{"params": [other], "name": "embed"}])
    before = _snapshot(as_muon)
    with pytest.raises(ValueError) as error:
        as_muon.load_state_dict(saved)
    message = str(error.value)
    assert message == "embed: state_dict was saved for rule 'adamw', this group has rule 'muon'"
    assert "\n" not in message
    assert _unchanged(as_muon, before)
    with pytest.raises(ValueError, match="saved for rule 'muon', this group has rule 'adamw'"):
        as_adamw.load_state_dict(as_muon.state_dict())


# ---- the commit guard -----------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_in_an_adamw_group_raises_and_changes_nothing(bad):
    groups, loss, params = _problem()
    opt = QuotientMuon(groups, lr=1e-2, adamw_lr=1e-2)
    _train(opt, loss, 2)
    opt.zero_grad()
    loss().backward()
    params[-1].grad[1, 2] = bad  # the adamw group "gains"
    before = _snapshot(opt)
    with pytest.raises(NonFiniteStepError, match="gains: the step produced non-finite values"):
        opt.step()
    assert _unchanged(opt, before)  # every group: parameters, state (the step counts too)
    assert [opt.state[p]["step"].item() for p in params[-2:]] == [2, 2]


def test_nonfinite_gradient_in_an_adamw_group_is_skipped_and_counted():
    groups, loss, params = _problem()
    opt = QuotientMuon(groups, lr=1e-2, adamw_lr=1e-2, nonfinite="skip")
    _train(opt, loss, 1)
    opt.zero_grad()
    loss().backward()
    params[-2].grad[0] = float("nan")
    before = _snapshot(opt)
    with pytest.warns(UserWarning, match="gains"):
        opt.step()
    assert _unchanged(opt, before)
    assert opt.skipped_steps() == {"heads": 0, "hidden": 0, "gains": 1}


# ---- the documentation's example ----------------------------------------------------------------


def test_the_documented_example_runs():
    """The python block of the QuotientMuon section of docs/theory/optimisers.md (a theory
    page, which tests/test_docs_snippets.py does not run)."""
    text = (ROOT / "docs" / "theory" / "optimisers.md").read_text()
    section = text.split("## QuotientMuon", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    assert len(blocks) == 1
    exec(compile(blocks[0], "docs/theory/optimisers.md", "exec"), {"__name__": "__doc_example__"})
