"""QuotientSGD / QuotientAdam: equivariance, descent, torch.optim conventions, reliability."""

from __future__ import annotations

import io

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import manifolds as M
from manifolds.testing import relative_error
from quotopt import NonFiniteStepError, QuotientAdam, QuotientSGD
from quotopt.optim import SkippedStepWarning
from tests.cases import examples
from tests.problems import matrix_sensing

BUNDLES = {
    "qk-euclidean": lambda: M.HeadQK(3, 8, 3),
    "qk-invariant": lambda: M.HeadQK(3, 8, 3, metric="invariant"),
    "ov-euclidean": lambda: M.HeadOV(2, 6, 2),
    "ov-invariant": lambda: M.HeadOV(2, 6, 2, metric="invariant"),
    "residual": lambda: M.ResidualRotation(5, (1, 0, -1), shapes=((9, 5), (5, 4), (3, 2, 5))),
    "product": lambda: M.ProductBundle(
        [M.HeadQK(2, 5, 2, metric="invariant"), M.ResidualRotation(4, (0,), shapes=((4, 3),))]
    ),
}
OPTIMISERS = {
    "qadam": lambda params: QuotientAdam(params, lr=1e-2),
    "qsgd": lambda params: QuotientSGD(params, lr=5e-2, momentum=0.9),
    "qsgd-nesterov-wd": lambda params: QuotientSGD(
        params, lr=5e-2, momentum=0.9, nesterov=True, weight_decay=1e-2
    ),
    "qadam-wd": lambda params: QuotientAdam(params, lr=1e-2, weight_decay=0.1),
}


def _invariant_loss(bundle, targets):
    """f(p) = Σ mean((invariant - target)²): a G-invariant regression of the orbit."""

    def loss(point):
        return sum(((i - t) ** 2).mean() for i, t in zip(bundle.invariants(point), targets))

    return loss


def _train(bundle, point, make_optimiser, steps, seed=5):
    params = [torch.nn.Parameter(t.clone()) for t in point]
    gen = torch.Generator().manual_seed(seed)
    targets = [torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in bundle.invariants(point)]
    loss_fn = _invariant_loss(bundle, targets)
    optimiser = make_optimiser(params)
    losses = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss = loss_fn(params)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return tuple(p.detach() for p in params), losses


def _orbit_gap(bundle, make_optimiser, steps=150, seed=1) -> float:
    """Train from p and from p·g (condition number 10); relative gap of the end invariants."""
    gen = torch.Generator().manual_seed(seed)
    p = bundle.random_point(generator=gen, dtype=torch.float64)
    g = bundle.random_group_element(generator=gen, dtype=torch.float64, condition=10.0)
    end_p, _ = _train(bundle, p, make_optimiser, steps)
    end_q, _ = _train(bundle, bundle.act(p, g), make_optimiser, steps)
    return relative_error(bundle.invariants(end_q), bundle.invariants(end_p))


def _undressed_qadam(bundle):
    return lambda params: QuotientAdam(
        [{"params": params, "bundle": bundle}], lr=1e-2, dress_every=None
    )


# ---- gauge equivariance --------------------------------------------------------------------


def check_gauge_equivariance(bundle, optimiser: str) -> None:
    """From p and p·g (condition number 10), 150 steps end on the same orbit (1e-6 rel)."""
    make = lambda params: OPTIMISERS[optimiser]([{"params": params, "bundle": bundle}])  # noqa: E731
    assert _orbit_gap(bundle, make) <= 1e-6


@pytest.mark.parametrize("optimiser", sorted(OPTIMISERS))
@pytest.mark.parametrize("bundle_name", sorted(BUNDLES))
def test_gauge_equivariance_by_default(bundle_name, optimiser):
    check_gauge_equivariance(BUNDLES[bundle_name](), optimiser)


@pytest.mark.parametrize("optimiser", ["qadam-wd", "qsgd-nesterov-wd"])
@pytest.mark.parametrize("bundle", examples())
def test_gauge_equivariance_of_every_case(bundle, optimiser):
    """Every bundle of tests/cases.py, with momentum and weight decay."""
    check_gauge_equivariance(bundle, optimiser)


@pytest.mark.parametrize("bundle_name", ["qk-invariant", "ov-invariant", "residual"])
def test_invariant_metrics_are_equivariant_without_dressing(bundle_name):
    """The geometry alone gives equivariance when the metric is G-invariant."""
    bundle = BUNDLES[bundle_name]()
    assert _orbit_gap(bundle, _undressed_qadam(bundle)) <= 1e-6


@pytest.mark.parametrize("bundle_name", ["qk-euclidean", "qk-invariant", "residual"])
def test_control_adamw_is_not_equivariant(bundle_name):
    """The same check fails for torch's AdamW: the test can fail."""
    bundle = BUNDLES[bundle_name]()
    assert _orbit_gap(bundle, lambda params: torch.optim.AdamW(params, lr=1e-2)) > 1e-2


def test_control_euclidean_heads_without_dressing_are_not_equivariant():
    """Dressing is what makes Euclidean-metric head steps equivariant."""
    bundle = BUNDLES["qk-euclidean"]()
    assert _orbit_gap(bundle, _undressed_qadam(bundle)) > 1e-2


# ---- descent on invariant toy problems -----------------------------------------------------


@pytest.mark.parametrize("metric", M.METRICS)
@pytest.mark.parametrize("optimiser", ["qadam", "qsgd"])
def test_matrix_sensing_with_gl_heads(metric, optimiser):
    """Recover rank-2 matrices M*_h from 40 random linear measurements each."""
    bundle, params, sensing_loss = matrix_sensing(metric)
    make = {
        "qadam": lambda: QuotientAdam(
            [{"params": params, "bundle": bundle}], lr=2e-2, weight_decay=0
        ),
        "qsgd": lambda: QuotientSGD([{"params": params, "bundle": bundle}], lr=2e-3, momentum=0.9),
    }[optimiser]
    opt = make()
    first = None
    for _ in range(400):
        opt.zero_grad()
        loss = sensing_loss()
        loss.backward()
        opt.step()
        first = loss.item() if first is None else first
    assert loss.item() < 1e-2 * first


def test_orthogonal_invariant_problem_descends():
    """Fit the row Gram matrix of an embedding table (an O(d)-invariant loss)."""
    torch.manual_seed(0)
    bundle = M.ResidualRotation(4, (1,), shapes=((12, 4),))
    target = bundle.invariants(bundle.random_point(dtype=torch.float64))[0]
    params = [torch.nn.Parameter(t) for t in bundle.random_point(dtype=torch.float64)]
    opt = QuotientAdam([{"params": params, "bundle": bundle}], lr=1e-2, weight_decay=0)
    losses = []
    for _ in range(300):
        opt.zero_grad()
        loss = ((bundle.invariants(params)[0] - target) ** 2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 1e-3 * losses[0]


# ---- groups without a bundle are torch's optimisers ------------------------------------------

PLAIN_CASES = [
    (torch.optim.AdamW, QuotientAdam, dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)),
    (torch.optim.AdamW, QuotientAdam, dict(lr=1e-2, maximize=True)),
    (torch.optim.SGD, QuotientSGD, dict(lr=1e-2)),
    (torch.optim.SGD, QuotientSGD, dict(lr=1e-2, momentum=0.9, dampening=0.3, weight_decay=0.1)),
    (torch.optim.SGD, QuotientSGD, dict(lr=1e-2, momentum=0.9, nesterov=True, maximize=True)),
]


@pytest.mark.parametrize("reference, ours, hyper", PLAIN_CASES)
def test_plain_groups_match_torch(reference, ours, hyper):
    torch.manual_seed(0)
    start = [torch.randn(5, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    runs = []
    for cls in (reference, ours):
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = cls(params, **hyper)
        gen = torch.Generator().manual_seed(3)
        for _ in range(25):
            opt.zero_grad()
            weights = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
            value = sum(torch.log1p((p - w) ** 2).sum() for p, w in zip(params, weights))
            (-value if hyper.get("maximize") else value).backward()
            opt.step()
        runs.append([p.detach() for p in params])
    for a, b in zip(*runs):
        assert relative_error(b, a) <= 1e-12


# ---- torch.optim conventions ---------------------------------------------------------------


def _mixed_problem(seed=0):
    """A head bundle group plus a plain group, with a loss coupling them."""
    torch.manual_seed(seed)
    bundle = M.HeadQK(2, 5, 2, metric="invariant")
    heads = [torch.nn.Parameter(t) for t in bundle.random_point(dtype=torch.float64)]
    plain = torch.nn.Parameter(torch.randn(5, dtype=torch.float64))
    x = torch.randn(7, 5, dtype=torch.float64)

    def loss():
        m = bundle.invariants(heads)[0]  # (2, 5, 5)
        return ((x @ m @ x.T).tanh().sum(0) @ (x @ plain)).square().mean() + plain.square().sum()

    groups = [{"params": heads, "bundle": bundle, "name": "heads"}, {"params": [plain]}]
    return groups, loss, heads + [plain]


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD])
def test_per_group_hyperparameters(cls):
    groups, loss, params = _mixed_problem()
    groups[0]["lr"] = 0.0
    opt = cls(groups, lr=1e-2)
    before = [p.detach().clone() for p in params]
    loss().backward()
    opt.step()
    assert opt.param_groups[0]["lr"] == 0.0 and opt.param_groups[1]["lr"] == 1e-2
    # lr 0 with dressing off leaves the bundle group still; the plain group moves
    assert not torch.equal(params[2], before[2])


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD])
def test_state_dict_resume_is_bit_exact_and_weights_only(cls):
    def make(groups):
        kwargs = {"momentum": 0.9} if cls is QuotientSGD else {}
        return cls(groups, lr=1e-2, dress_every=3, **kwargs)

    groups, loss, params = _mixed_problem()
    opt = make(groups)
    for _ in range(5):
        opt.zero_grad()
        loss().backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buffer)
    for _ in range(6):
        opt.zero_grad()
        loss().backward()
        opt.step()
    reference = [p.detach().clone() for p in params]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    groups2, loss2, params2 = _mixed_problem()
    with torch.no_grad():
        for p, s in zip(params2, saved["params"]):
            p.copy_(s)
    opt2 = make(groups2)
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["bundle"] is groups2[0]["bundle"]
    for _ in range(6):
        opt2.zero_grad()
        loss2().backward()
        opt2.step()
    for a, b in zip(reference, params2):
        assert torch.equal(a, b.detach())


def test_load_state_dict_rejects_another_bundle():
    groups, _, _ = _mixed_problem()
    state = QuotientAdam(groups).state_dict()
    other = [{"params": groups[0]["params"], "bundle": M.HeadQK(2, 5, 2)}, groups[1]]
    with pytest.raises(ValueError, match="saved for bundle HeadQK.*invariant"):
        QuotientAdam(other).load_state_dict(state)


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD])
def test_lr_scheduler_and_closure(cls):
    groups, loss, _ = _mixed_problem()
    opt = cls(groups, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    def closure():
        opt.zero_grad()
        value = loss()
        value.backward()
        return value

    values = []
    for _ in range(4):
        values.append(opt.step(closure).item())
        scheduler.step()
    assert all(torch.isfinite(torch.tensor(values)))
    assert opt.param_groups[0]["lr"] == pytest.approx(2.5e-3)
    opt.zero_grad()
    assert all(p.grad is None for g in opt.param_groups for p in g["params"])


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD])
def test_parameters_without_gradients_are_skipped(cls):
    groups, _, params = _mixed_problem()
    opt = cls(groups, lr=1e-2)
    before = [p.detach().clone() for p in params]
    params[2].grad = torch.ones_like(params[2])
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before[:2], params[:2]))
    assert not torch.equal(before[2], params[2])
    assert not opt.state[params[0]]


def test_unsupported_and_invalid_options_are_rejected():
    groups, _, _ = _mixed_problem()
    for option in ({"foreach": True}, {"fused": True}, {"capturable": True}):
        with pytest.raises(ValueError, match="does not implement"):
            QuotientAdam(groups, **option)
    with pytest.raises(ValueError, match="does not implement differentiable"):
        QuotientSGD(groups, differentiable=True)
    with pytest.raises(ValueError, match="Invalid learning rate: -1"):
        QuotientAdam(groups, lr=-1)
    with pytest.raises(ValueError, match=r"beta parameter at index 1: 1.0 \(expected 0 <= "):
        QuotientAdam(groups, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="Nesterov"):
        QuotientSGD(groups, nesterov=True)
    with pytest.raises(ValueError, match="dress_every must be None or a positive integer"):
        QuotientAdam(groups, dress_every=0)
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        QuotientAdam(groups, nonfinite="ignore")


def test_bad_group_names_the_group_and_shapes():
    bundle = M.HeadQK(2, 5, 2)
    wrong = [torch.nn.Parameter(torch.zeros(2, 5, 3)), torch.nn.Parameter(torch.zeros(2, 5, 2))]
    with pytest.raises(
        ValueError,
        match=r"attn.0.qk: HeadQK: point\[0\] has shape \(2, 5, 3\), expected \(2, 5, 2\)",
    ):
        QuotientAdam([{"params": wrong, "bundle": bundle, "name": "attn.0.qk"}])
    with pytest.raises(ValueError, match="must be a manifolds.Bundle"):
        QuotientAdam([{"params": wrong, "bundle": "HeadQK"}])


# ---- reliability: non-finite gradients --------------------------------------------------------


def _snapshot(opt, params):
    state = {
        id(p): {
            k: (tuple(x.clone() for x in v) if isinstance(v, tuple) else v.clone())
            for k, v in opt.state[p].items()
        }
        for p in params
        if opt.state[p]
    }
    return [p.detach().clone() for p in params], state


def _assert_same(snapshot, opt, params):
    values, state = snapshot
    assert all(torch.equal(a, b) for a, b in zip(values, params))
    for p in params:
        for key, value in state.get(id(p), {}).items():
            now = opt.state[p][key]
            pairs = zip(value, now) if isinstance(value, tuple) else [(value, now)]
            assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_raises_naming_the_group(cls, bad):
    groups, loss, params = _mixed_problem()
    opt = cls(groups, lr=1e-2)
    loss().backward()
    opt.step()
    snapshot = _snapshot(opt, params)
    opt.zero_grad()
    loss().backward()
    params[1].grad[0, 0, 0] = bad
    with pytest.raises(NonFiniteStepError, match="heads: the step produced non-finite values"):
        opt.step()
    _assert_same(snapshot, opt, params)


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD])
def test_nonfinite_gradient_skipped_on_request(cls):
    groups, loss, params = _mixed_problem()
    opt = cls(groups, lr=1e-2, nonfinite="skip")
    loss().backward()
    opt.step()
    snapshot = _snapshot(opt, params)
    opt.zero_grad()
    loss().backward()
    params[2].grad[2] = float("nan")
    with pytest.warns(SkippedStepWarning, match="step was skipped"):
        opt.step()
    _assert_same(snapshot, opt, params)
    opt.zero_grad()
    loss().backward()
    opt.step()  # training goes on
    assert not torch.equal(snapshot[0][2], params[2])


def test_huge_finite_gradient_cannot_poison_adam_state():
    """g² overflowing float32 would leave inf in the second moment: the step is refused."""
    bundle = M.HeadQK(1, 3, 1)
    params = [torch.nn.Parameter(t) for t in bundle.random_point()]
    opt = QuotientAdam([{"params": params, "bundle": bundle}], lr=1e-3)
    params[0].grad = torch.full_like(params[0], 1e30)
    params[1].grad = torch.zeros_like(params[1])
    with pytest.raises(NonFiniteStepError):
        opt.step()
    assert not opt.state[params[0]] or all(
        torch.isfinite(t).all() for t in opt.state[params[0]]["exp_avg_sq"]
    )


# ---- performance structure: batched over heads, no host reads in the update -------------------


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _ops_of_one_step(n_heads, cls, dtype=None):
    bundle = M.HeadQK(n_heads, 8, 4, metric="invariant")
    params = [torch.nn.Parameter(t) for t in bundle.random_point(dtype=dtype)]
    opt = cls([{"params": params, "bundle": bundle}], lr=1e-3, dress_every=1)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # lazy state creation
    counter = _OpCounter()
    with counter:
        opt.step()
    return counter.ops


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD])
def test_step_is_batched_over_heads(cls):
    """The same operations run for 2 heads and for 16: no Python loop over heads."""
    assert _ops_of_one_step(2, cls) == _ops_of_one_step(16, cls)


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD])
def test_only_host_read_is_the_finiteness_check(cls):
    """The update itself never reads a device value; on the CPU the commit reads one flag (on
    accelerators that flag is copied asynchronously and read a step later). On the CPU only,
    where a read costs nothing, float32 frames add one read per factorisation (whether the
    frame must be formed again in float64 to resolve a head's rank,
    ``FactoredBundle.factorise``) and Cholesky frames one per Gram (whether some head needs
    the damped factorisation); on accelerators neither is read
    (``test_cuda_step_never_synchronises``)."""
    ops = _ops_of_one_step(4, cls, torch.float64)
    cholesky = ops.count("aten.linalg_cholesky_ex.default")
    assert cholesky > 0  # the problem has an invariant-metric group: the rule is exercised
    assert ops.count("aten._local_scalar_dense.default") == 1 + cholesky
    assert not any("nonzero" in op for op in ops)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD])
def test_cuda_step_never_synchronises(cls):
    groups, loss, params = _mixed_problem()
    for group in groups:
        group["params"] = [torch.nn.Parameter(p.detach().cuda()) for p in group["params"]]
    opt = cls(groups, lr=1e-3)
    for p in (p for g in groups for p in g["params"]):
        p.grad = torch.randn_like(p)
    opt.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    gpu = [p for g in groups for p in g["params"]]
    gpu[0].grad[0, 0, 0] = float("nan")
    snapshot = [p.detach().clone() for p in gpu]
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(snapshot, gpu))
    with pytest.raises(NonFiniteStepError, match="heads"):
        opt.raise_if_nonfinite()


@pytest.mark.parametrize("cls", [QuotientAdam, QuotientSGD])
def test_bfloat16_parameters_step_and_redress(cls):
    """Low-precision points go through dressing too (small solves run in float32)."""
    bundle = M.HeadQK(2, 8, 2)
    params = [torch.nn.Parameter(t.bfloat16()) for t in bundle.random_point()]
    opt = cls([{"params": params, "bundle": bundle}], lr=1e-2, dress_every=1)
    for _ in range(3):
        opt.zero_grad()
        bundle.invariants(params)[0].float().square().sum().backward()
        opt.step()
    assert params[0].dtype == torch.bfloat16
    assert all(bool(torch.isfinite(p).all()) for p in params)
