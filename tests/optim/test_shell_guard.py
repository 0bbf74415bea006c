"""The commit guard as users see it: skipped steps are counted per group and warned about,
failures name the heads they come from, and a loaded state that could not step (another
optimiser's, or one holding NaN) is refused at ``load_state_dict``, changing nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import manifolds as M
from quotopt import NonFiniteStepError, QuotientAdam, QuotientMuon, QuotientSGD
from quotopt.optim import SkippedStepWarning

OPTIMISERS = {
    "qadam": lambda groups, **kw: QuotientAdam(groups, lr=1e-2, **kw),
    "qsgd": lambda groups, **kw: QuotientSGD(groups, lr=1e-2, momentum=0.9, **kw),
    "qmuon": lambda groups, **kw: QuotientMuon(groups, lr=1e-2, **kw),
}


def _groups(bundle, seed=0):
    gen = torch.Generator().manual_seed(seed)
    point = [torch.nn.Parameter(t) for t in bundle.random_point(generator=gen)]
    rest = torch.nn.Parameter(torch.randn(4, 3, generator=gen))
    return [
        {"params": point, "bundle": bundle, "name": "heads"},
        {"params": [rest], "name": "rest"},
    ]


def _grads(groups, seed, poison=None):
    """Random gradients; ``poison = (tensor index, head)``: a NaN in that head's slice."""
    gen = torch.Generator().manual_seed(seed)
    for group in groups:
        for p in group["params"]:
            p.grad = torch.randn(p.shape, generator=gen)
    if poison is not None:
        tensor, head = poison
        groups[0]["params"][tensor].grad[head].view(-1)[0] = float("nan")


def _values(groups):
    return [p.detach().clone() for g in groups for p in g["params"]]


# ---- skipped steps: counted, warned, naming the head -------------------------------------------


@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
@pytest.mark.parametrize("kind", sorted(OPTIMISERS))
def test_skipped_steps_are_counted_per_group_and_warned(kind, metric):
    groups = _groups(M.HeadQK(3, 6, 2, metric=metric))
    optimiser = OPTIMISERS[kind](groups, nonfinite="skip")
    _grads(groups, 0)
    optimiser.step()
    before = _values(groups)
    for seed in (1, 2, 3):
        _grads(groups, seed, poison=(0, 1))
        with pytest.warns(SkippedStepWarning, match=r"^heads: .*heads \[1\]: non-finite gradient"):
            optimiser.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _values(groups)))
    assert optimiser.skipped_steps() == {"heads": 3, "rest": 0}
    _grads(groups, 4)
    optimiser.step()  # a finite step is taken and not counted
    assert not any(torch.equal(a, b) for a, b in zip(before, _values(groups)))
    assert optimiser.skipped_steps() == {"heads": 3, "rest": 0}


@pytest.mark.parametrize("kind", sorted(OPTIMISERS))
def test_control_finite_steps_are_neither_skipped_nor_warned(kind):
    groups = _groups(M.HeadQK(3, 6, 2))
    optimiser = OPTIMISERS[kind](groups, nonfinite="skip")
    for seed in range(3):  # warnings are errors here: any warning fails the test
        _grads(groups, seed)
        optimiser.step()
    assert optimiser.skipped_steps() == {"heads": 0, "rest": 0}


@pytest.mark.parametrize("metric", ["euclidean", "invariant"])
@pytest.mark.parametrize("kind", sorted(OPTIMISERS))
@pytest.mark.parametrize("head", [0, 2])
def test_raise_mode_names_the_head_at_fault(kind, metric, head):
    groups = _groups(M.HeadQK(3, 6, 2, metric=metric))
    optimiser = OPTIMISERS[kind](groups)
    _grads(groups, 0, poison=(1, head))
    with pytest.raises(NonFiniteStepError, match=rf"^heads: .*\(heads \[{head}\]: non-finite"):
        optimiser.step()


def test_heads_of_a_product_are_numbered_like_rank_deficient_heads():
    """A product's heads are its components' heads one after the other (QK: 0, 1; OV: 2, 3),
    as ``rank_deficient_heads()`` numbers them: a NaN in the OV pair's head 1 is head 3."""
    bundle = M.ProductBundle([M.HeadQK(2, 6, 3), M.HeadOV(2, 6, 3)])
    groups = _groups(bundle)
    optimiser = QuotientAdam(groups, lr=1e-2)
    _grads(groups, 0, poison=(2, 1))
    with pytest.raises(NonFiniteStepError, match=r"\(heads \[3\]: non-finite gradient\)"):
        optimiser.step()


def test_an_overflowing_step_names_its_heads():
    groups = _groups(M.HeadQK(3, 6, 2))
    optimiser = QuotientSGD(groups, lr=1e38)
    _grads(groups, 0)
    with pytest.raises(NonFiniteStepError, match=r"heads \[[0-9, ]+\]: the step overflowed"):
        optimiser.step()


# ---- loading a state that could not step ---------------------------------------------------------


def _plain_pair(reference, ours):
    """A torch optimiser and a plain-group quotopt one on copies of one weight, one step each."""
    weights = [torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
               for _ in range(2)]  # fmt: skip
    torch_opt, quotopt_opt = reference([weights[0]]), ours([weights[1]])
    for w, opt in zip(weights, (torch_opt, quotopt_opt)):
        w.grad = torch.ones_like(w)
        opt.step()
    return torch_opt, quotopt_opt, weights[1]


def _state_copy(optimiser):
    return [{k: v.clone() for k, v in s.items()} for s in optimiser.state.values()]


@pytest.mark.parametrize(
    "reference, ours",
    [
        (lambda p: torch.optim.AdamW(p, lr=1e-2), lambda p: QuotientAdam(p, lr=1e-2)),
        (lambda p: torch.optim.Muon(p, lr=1e-2), lambda p: QuotientMuon(p, lr=1e-2)),
        (lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
         lambda p: QuotientSGD(p, lr=1e-2, momentum=0.9)),
    ],
)  # fmt: skip
def test_a_torch_state_is_refused_at_load(reference, ours):
    """The state keys and shapes match torch's exactly, but the groups lack the quotient
    optimiser's keys: refused in one line, nothing written, the optimiser still steps."""
    torch_opt, quotopt_opt, weight = _plain_pair(reference, ours)
    before, state = weight.detach().clone(), _state_copy(quotopt_opt)
    with pytest.raises(ValueError, match=r"param group 0: state_dict group lacks the keys \["):
        quotopt_opt.load_state_dict(torch_opt.state_dict())
    assert torch.equal(before, weight)
    assert all(
        all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(state, quotopt_opt.state.values())
    )
    assert quotopt_opt.param_groups[0]["name"] == "param group 0"
    weight.grad = torch.ones_like(weight)
    quotopt_opt.step()


def test_control_a_quotopt_state_loads():
    _, quotopt_opt, weight = _plain_pair(lambda p: torch.optim.AdamW(p), QuotientAdam)
    quotopt_opt.load_state_dict(quotopt_opt.state_dict())
    weight.grad = torch.ones_like(weight)
    quotopt_opt.step()


@pytest.mark.parametrize("where", ["plain", "bundle"])
def test_a_non_finite_moment_is_refused_at_load(where):
    groups = _groups(M.HeadQK(2, 6, 2))
    optimiser = QuotientAdam(groups, lr=1e-2)
    _grads(groups, 0)
    optimiser.step()
    saved = copy.deepcopy(optimiser.state_dict())  # its tensors are the optimiser's own
    index = 0 if where == "bundle" else len(groups[0]["params"])
    entry = saved["state"][index]
    exp_avg = entry["exp_avg"][0] if where == "bundle" else entry["exp_avg"]
    exp_avg.view(-1)[0] = float("nan")
    twin = QuotientAdam(_groups(M.HeadQK(2, 6, 2)), lr=1e-2)
    before = _values(twin.param_groups)
    with pytest.raises(ValueError, match="state 'exp_avg' holds non-finite values"):
        twin.load_state_dict(saved)
    assert not twin.state
    assert all(torch.equal(a, b) for a, b in zip(before, _values(twin.param_groups)))


def test_invalid_loaded_hyperparameters_are_refused():
    groups = _groups(M.HeadQK(2, 6, 2))
    optimiser = QuotientMuon(groups, lr=1e-2)
    saved = optimiser.state_dict()
    saved["param_groups"][1]["momentum"] = 1.0
    with pytest.raises(ValueError, match=r"rest: Invalid momentum value: 1.0 \(expected"):
        optimiser.load_state_dict(saved)
    assert optimiser.param_groups[1]["momentum"] == 0.95


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_skipped_steps_are_counted_without_synchronising():
    """On accelerators a skipped step is masked on the device and counted when its flags
    reach the host: ``step()`` never waits, ``skipped_steps()`` does."""
    groups = _groups(M.HeadQK(3, 6, 2))
    for group in groups:
        group["params"] = [torch.nn.Parameter(p.detach().cuda()) for p in group["params"]]
    optimiser = QuotientAdam(groups, lr=1e-2, nonfinite="skip")
    gen = torch.Generator().manual_seed(0)
    for p in (p for g in groups for p in g["params"]):
        p.grad = torch.randn(p.shape, generator=gen).cuda()
    optimiser.step()
    groups[0]["params"][0].grad[1, 0, 0] = float("nan")
    before = _values(groups)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimiser.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(before, _values(groups)))
    with pytest.warns(SkippedStepWarning, match="^heads: an earlier step produced non-finite"):
        assert optimiser.skipped_steps() == {"heads": 1, "rest": 0}


def test_a_hyperparameter_missing_from_a_saved_group_keeps_the_current_value():
    groups = _groups(M.HeadQK(2, 6, 2))
    optimiser = QuotientMuon(groups, lr=1e-2, momentum=0.9)
    _grads(groups, 0)
    optimiser.step()
    saved = copy.deepcopy(optimiser.state_dict())
    for group in saved["param_groups"]:
        del group["momentum"]
    optimiser.load_state_dict(saved)
    assert [g["momentum"] for g in optimiser.param_groups] == [0.9, 0.9]
    _grads(groups, 1)
    optimiser.step()
