"""The plain AdamW groups of QuotientAdam hold little between computing a step and committing
it (``quotopt.optim.adam.adam_plain_in_place``). On the CPU, when the gradients and parameters
bound the result, nothing is held at all: torch's own AdamW runs in place at the commit
(``torch.optim.AdamW``'s values bit for bit). Otherwise the moments are advanced in place at
the commit, and for groups above ``HOLD_ELEMENTS`` the new parameters formed there too, with
the values of ``adam_plain_updates``. A step that is not finite changes nothing."""

from __future__ import annotations

import pytest
import torch

from quotopt import NonFiniteStepError, QuotientAdam
from quotopt.optim import adam as plain
from quotopt.optim import deferred


def _params(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (13,), (3, 4, 2), (6, 6)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def _run(params, steps=6, **hyper):
    opt = QuotientAdam(params, **hyper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
    return opt


@pytest.mark.parametrize("hyper", [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, maximize=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_holding_or_forming_at_commit_gives_the_pure_update_bit_for_bit(monkeypatch, hyper, dtype):
    reference = _params(dtype)
    states = [{"step": torch.zeros((), dtype=torch.float64), "exp_avg": torch.zeros_like(p),
               "exp_avg_sq": torch.zeros_like(p)} for p in reference]  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    values = [p.detach().clone() for p in reference]
    beta = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=hyper.get("weight_decay", 0.01))
    for _ in range(6):
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in values]
        values, states = plain.adam_plain_updates(
            values, grads, states, lr=hyper["lr"], maximize=hyper.get("maximize", False), **beta
        )
    monkeypatch.setattr(deferred, "_can_defer", lambda *args: False)  # the checked paths
    for hold, chunk in ((1 << 24, 1 << 22), (0, 40)):  # held; formed at commit, in chunks
        monkeypatch.setattr(plain, "HOLD_ELEMENTS", hold)
        monkeypatch.setattr(plain, "CHUNK_ELEMENTS", chunk)
        params = _params(dtype)
        opt = _run(params, **hyper)
        assert all(torch.equal(p.detach(), v) for p, v in zip(params, values))
        for p, s in zip(params, states):
            assert torch.equal(opt.state[p]["exp_avg"], s["exp_avg"])
            assert torch.equal(opt.state[p]["exp_avg_sq"], s["exp_avg_sq"])
            assert float(opt.state[p]["step"]) == 6


@pytest.mark.parametrize("hyper", [dict(lr=1e-2, weight_decay=0.1), dict(lr=3e-3, maximize=True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_deferred_step_is_torch_adamw_bit_for_bit(monkeypatch, hyper, dtype):
    calls = []
    can_defer = deferred._can_defer
    monkeypatch.setattr(deferred, "_can_defer", lambda *a: calls.append(can_defer(*a)) or calls[-1])
    params, reference = _params(dtype), _params(dtype)
    opt = _run(params, **hyper)
    torch_opt = torch.optim.AdamW(reference, **hyper)
    gen = torch.Generator().manual_seed(1)
    for _ in range(6):
        for p in reference:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        torch_opt.step()
    assert calls and all(calls)  # every step was deferred
    assert all(torch.equal(p, q) for p, q in zip(params, reference))
    for p, q in zip(params, reference):
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], torch_opt.state[q][key])


def test_gradients_beyond_the_bound_are_not_deferred():
    params = _params()
    grads = [torch.zeros_like(p) for p in params]
    assert deferred._can_defer(params, grads, 1e-3, 1e-8)
    grads[1][3] = 1e19  # finite, but its square is not (float32): the checked path decides
    assert not deferred._can_defer(params, grads, 1e-3, 1e-8)
    grads[1][3] = float("nan")
    assert not deferred._can_defer(params, grads, 1e-3, 1e-8)
    assert not deferred._can_defer(params, [torch.zeros_like(p) for p in params], 1e-3, 1e-40)
    half = [p.detach().to(torch.bfloat16) for p in params]
    assert not deferred._can_defer(half, [torch.zeros_like(p) for p in half], 1e-3, 1e-8)


@pytest.mark.parametrize("hold", [1 << 24, 0])
@pytest.mark.parametrize("fault", ["nan gradient", "overflow", "huge gradient"])
def test_a_step_that_is_not_finite_changes_nothing(monkeypatch, hold, fault):
    monkeypatch.setattr(plain, "HOLD_ELEMENTS", hold)
    monkeypatch.setattr(plain, "CHUNK_ELEMENTS", 40)
    params = _params()
    opt = _run(params, steps=2, lr=1e-2)
    before = [p.detach().clone() for p in params]
    state = {k: (v.clone() if isinstance(v, torch.Tensor) else v)
             for p in params for k, v in opt.state[p].items()}  # fmt: skip
    snapshot = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    for p in params:
        p.grad = torch.ones_like(p)
    if fault == "nan gradient":
        params[2].grad[0, 0, 0] = float("nan")
    elif fault == "huge gradient":  # finite, squares to inf in the second moment
        params[2].grad[0, 0, 0] = 3e38
    else:
        for group in opt.param_groups:
            group["lr"] = 1e38
            group["weight_decay"] = 0.0
        with torch.no_grad():
            params[3].fill_(3e38)
    if fault == "overflow":
        before = [p.detach().clone() for p in params]
    with pytest.raises(NonFiniteStepError):
        opt.step()
    assert all(torch.equal(a, p.detach()) for a, p in zip(before, params))
    for p, saved in zip(params, snapshot):
        assert all(torch.equal(opt.state[p][k], v) for k, v in saved.items())
    assert state  # the state existed before the failed step
