r"""Act on a model through its groups, and check numerically that a group is a symmetry.

* ``group_point`` / ``write_point``: a group's bundle point and its one write-back
  (``Layout.write_back``).
* ``gauge_transform``: a random group element applied in place.
* ``verify``: the relative output change of a deep copy under random group elements — in eval mode
  (dropout is not a symmetry breach), with every parameter of the modules a group touches
  randomised first (a zero-initialised bias a declaration forgot would otherwise hide the
  mistake), on any output that holds tensors (``ModelOutput``, dicts, tuples with ``None``).
* ``check_in_module``: the same test for one detected candidate on a float64 copy of the smallest
  module that holds it, with random inputs — how ``quotopt.symmetries`` accepts what it detects.
  The copy runs with float64 as torch's default dtype (a constant a module builds without a dtype,
  ``torch.full((), torch.finfo(x.dtype).min)``, is then float64 like its input); a copy that
  fails before any group acts raises ``Float64Error``: the module, not the candidate, is at fault.

The change is ‖f(p·g) − f(p)‖ / ‖f(p)‖ over all compared output tensors, the worst over the
trials: round-off for a symmetry (≈1e-16 in float64; ≈1e-7 where a module computes a step in
float32 whatever its input dtype, as Hugging Face's norms and T5's softmax do), ≥1e-3 for a
wrong group at condition number 10.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from .layouts import copy_into

__all__ = [
    "Float64Error",
    "VerifyResult",
    "check_in_module",
    "gauge_transform",
    "group_point",
    "output_tensors",
    "randomise_",
    "verify",
    "write_point",
]


def group_point(group: dict) -> tuple[torch.Tensor, ...]:
    """The bundle point of a group (views of the parameters where the layout allows)."""
    layout = group.get("layout")
    params = list(group["params"])
    return tuple(layout(params)) if layout is not None else tuple(params)


@torch.no_grad()
def write_point(group: dict, point: Sequence[torch.Tensor]) -> None:
    """Write bundle coordinates back into the group's parameters (``Layout.write_back``)."""
    layout = group.get("layout")
    if layout is not None:
        layout.write_back(list(group["params"]), tuple(point))
    else:
        for target, value in zip(group["params"], point):
            copy_into(target, value)


@torch.no_grad()
def gauge_transform(
    model: nn.Module,
    groups: Sequence[dict],
    generator=None,
    condition: float = 10.0,
    round_trip: bool = False,
) -> dict:
    """Apply a random element of every bundle group's group to the model, in place.

    Returns ``{group name: group element}``. Elements of non-compact groups have condition
    number ``condition``. ``round_trip``: apply g, then g⁻¹ — the same gauge again, with the
    round-off of both transformations in the parameters' precision (a control for what that
    round-off alone does).
    """
    del model  # the groups hold the model's own parameters
    applied = {}
    for group in groups:
        bundle = group.get("bundle")
        if bundle is None:
            continue
        point = group_point(group)
        g = bundle.random_group_element(
            generator=generator, dtype=point[0].dtype, device=point[0].device, condition=condition
        )
        write_point(group, bundle.act(point, g))
        if round_trip:
            write_point(group, bundle.act(group_point(group), bundle.inverse(g)))
        applied[group["name"]] = g
    return applied


def output_tensors(out, path: str = "output") -> list[tuple[str, torch.Tensor]]:
    """Every floating-point tensor in ``out`` (tensors, mappings — ``ModelOutput`` included —,
    tuples and lists, nested), with its path; ``None`` and other leaves are skipped."""
    if isinstance(out, torch.Tensor):
        return [(path, out)] if out.is_floating_point() or out.is_complex() else []
    if isinstance(out, Mapping):
        return [t for k, v in out.items() for t in output_tensors(v, f"{path}.{k}")]
    if isinstance(out, (tuple, list)):
        return [t for i, v in enumerate(out) for t in output_tensors(v, f"{path}[{i}]")]
    return []


def _relative_change(moved, reference) -> float:
    num = sum(((a.double() - b.double()) ** 2).sum() for (_, a), (_, b) in zip(moved, reference))
    den = sum((b.double() ** 2).sum() for _, b in reference)
    return float(torch.sqrt(num) / torch.sqrt(den).clamp_min(1e-300))


@torch.no_grad()
def randomise_(params, generator=None) -> None:
    """Perturb each tensor in place by N(0, s²), s = ½·rms(p), or 0.1 where p is all zero."""
    for p in params:
        rms = float(p.double().square().mean().sqrt()) if p.numel() else 0.0
        scale = 0.5 * rms if rms > 0 else 0.1
        noise = torch.randn(p.shape, generator=generator, dtype=p.dtype, device="cpu")
        p.add_(scale * noise.to(p.device))


class VerifyResult(dict):
    """``{group name: relative output change}``, with what was compared: ``compared`` (output
    paths and shapes), ``randomised`` (parameter names perturbed first), ``mode`` and
    ``trials``."""

    compared: list[str]
    randomised: list[str]
    mode: str = "eval"
    trials: int = 1

    def __str__(self) -> str:
        lines = [
            f"verify ({self.mode} mode, {self.trials} trial(s)); compared: "
            + ", ".join(self.compared)
        ]
        lines += [f"  {name:<40} {change:.1e}" for name, change in self.items()]
        return "\n".join(lines)


def _apply_and_compare(twin, twin_group, run, reference, trials, generator, condition):
    saved = [p.detach().clone() for p in twin_group["params"]]
    worst = 0.0
    for _ in range(trials):
        gauge_transform(twin, [twin_group], generator=generator, condition=condition)
        worst = max(worst, _relative_change(output_tensors(run()), reference))
        for p, s in zip(twin_group["params"], saved):
            p.copy_(s)
    return worst


@torch.no_grad()
def verify(
    model: nn.Module,
    groups: Sequence[dict],
    *inputs,
    generator=None,
    condition: float = 10.0,
    trials: int = 1,
    randomize: bool = True,
    **kwargs,
) -> VerifyResult:
    """Largest relative output change per bundle group under random group elements.

    Works on a deep copy in eval mode: ``model`` (parameters and train/eval mode) is left
    untouched. With ``randomize`` every parameter of each module that owns a parameter of a bundle
    group is perturbed first (``randomise_``), so parameters a declaration left out count even
    where they are initialised to zero. ``inputs`` and ``kwargs`` go to ``model``'s forward.
    """
    twin = copy.deepcopy(model).eval()
    twin_params = dict(twin.named_parameters())
    by_id = {id(p): twin_params[n] for n, p in model.named_parameters()}
    covered = {id(by_id[id(p)]) for g in groups if g.get("bundle") for p in g["params"]}
    randomised = []
    if randomize:
        for prefix, module in twin.named_modules():
            own = list(module.named_parameters(recurse=False))
            if any(id(p) in covered for _, p in own):
                randomise_([p for _, p in own], generator)
                randomised += [f"{prefix}.{n}" if prefix else n for n, _ in own]
    run = lambda: twin(*inputs, **kwargs)  # noqa: E731
    reference = output_tensors(run())
    if not reference:
        raise ValueError(f"verify: {type(model).__name__}'s output holds no floating-point tensor")
    result = VerifyResult()
    result.compared = [f"{path} {tuple(t.shape)}" for path, t in reference]
    result.randomised, result.trials = randomised, trials
    for group in groups:
        if group.get("bundle") is None:
            continue
        missing = [p for p in group["params"] if id(p) not in by_id]
        if missing:
            raise ValueError(f"{group['name']}: a tensor that is not a parameter of the model")
        twin_group = dict(group, params=[by_id[id(p)] for p in group["params"]])
        result[group["name"]] = _apply_and_compare(
            twin, twin_group, run, reference, trials, generator, condition
        )
    return result


_STATE_NAMES = (
    "hidden_states",
    "key_value_states",
    "encoder_hidden_states",
    "query",
    "key",
    "value",
    "x",
    "input",
    "src",
    "tgt",
    "memory",
)


def _as_double(value, generator, fresh: bool):
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        if fresh:
            return torch.randn(value.shape, generator=generator, dtype=torch.float64).to(
                value.device
            )
        return value.double()
    if isinstance(value, (tuple, list)):
        return type(value)(_as_double(v, generator, False) for v in value)
    if "Cache" in type(value).__name__:
        return None  # a key/value cache would be updated by the probe
    return value


def double_call(call, generator=None):
    """A recorded ``(args, kwargs)`` call in float64 with fresh N(0, 1) hidden states: the first
    positional tensor and the keyword arguments named like a stream (``hidden_states``, …)."""
    args, kwargs = call
    new_args = [_as_double(a, generator, i == 0) for i, a in enumerate(args)]
    new_kwargs = {k: _as_double(v, generator, k in _STATE_NAMES) for k, v in kwargs.items()}
    return new_args, new_kwargs


class Float64Error(RuntimeError):
    """A module's float64 copy fails before any group acts (``check_in_module``); ``module`` is
    the class name, ``error`` the exception its forward raised."""

    def __init__(self, module: str, error: Exception):
        self.module, self.error = module, error
        super().__init__(f"the float64 copy of {module} fails ({type(error).__name__}: {error})")


@contextmanager
def _float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


@torch.no_grad()
def check_in_module(
    module: nn.Module, group: dict, call, generator=None, trials: int = 2, condition: float = 10.0
) -> tuple[float, list[str]]:
    """(relative change, compared outputs) of ``group`` on a float64 copy of ``module`` with all
    of its parameters randomised, called as ``call`` = (args, kwargs) with fresh hidden states.

    Raises ``Float64Error`` where the copy fails before a group element is applied."""
    names = {id(p): n for n, p in module.named_parameters()}
    twin = copy.deepcopy(module).double().eval()
    twin_params = dict(twin.named_parameters())
    twin_group = dict(group, params=[twin_params[names[id(p)]] for p in group["params"]])
    randomise_(twin.parameters(), generator)
    args, kwargs = double_call(call, generator)
    run = lambda: twin(*args, **kwargs)  # noqa: E731
    with _float64_default():
        try:
            reference = output_tensors(run())
        except Exception as error:  # noqa: BLE001 - re-raised with the module it belongs to
            raise Float64Error(type(module).__name__, error) from error
        change = _apply_and_compare(twin, twin_group, run, reference, trials, generator, condition)
    compared = [f"{path} {tuple(t.shape)}" for path, t in reference]
    return change, compared
