"""The stateful shell shared by QuotientSGD and QuotientAdam.

A param group with a ``"bundle"`` key (a ``manifolds.Bundle``) is updated on the bundle's
quotient; its ``"params"`` are either the bundle's point, in order, or the model's own
parameters together with a ``"layout"``: a callable mapping a list of tensors shaped like the
params (the params themselves, or their gradients) to views in the bundle's point order. Writes
go through those views, so fused or transposed storage (``nn.MultiheadAttention``'s
``in_proj_weight``, ``nn.Linear``'s (out, in) weights) is updated in place.

Steps are computed out of place and committed only when every new value is finite. On the CPU
the check is a plain host read. On accelerators the commit is masked with ``torch.where`` (no
host synchronisation) and the finiteness flags are inspected at the start of the next
``step()`` — or at once by ``raise_if_nonfinite()`` — so a skipped step raises one call late but
never corrupts parameters or state.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from manifolds import Bundle, unchecked

__all__ = ["QuotientOptimizer", "NonFiniteStepError"]

_NONFINITE_MODES = ("raise", "skip")
_STRUCTURAL_KEYS = ("bundle", "layout")
_UNSUPPORTED = ("foreach", "fused", "capturable", "differentiable")


class NonFiniteStepError(ValueError):
    """A step produced non-finite parameters or state; nothing was written."""


def _check_nonnegative(name: str, value, upper: float | None = None) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"Invalid {name}: {value!r} (expected a finite number)")
    if value < 0 or (upper is not None and value >= upper):
        rule = f"0 <= {name} < {upper}" if upper is not None else f"{name} >= 0"
        raise ValueError(f"Invalid {name}: {value} (expected {rule})")


def _reject_unsupported(cls_name: str, options: dict) -> None:
    for name, value in options.items():
        if value not in (None, False):
            raise ValueError(
                f"{cls_name} does not implement {name}={value!r}; its steps are already batched "
                "over heads (leave the option unset)"
            )


class _FlagCopy:
    """Finiteness flags copied to the host without blocking (CUDA: pinned memory + event)."""

    def __init__(self, flags: torch.Tensor, names: list[str]):
        self.names = names
        if flags.device.type == "cuda":
            self._host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self._host.copy_(flags, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host, self._event = flags, None

    def ready(self) -> bool:
        return self._event is None or self._event.query()

    def host(self) -> torch.Tensor:
        if self._event is not None:
            self._event.synchronize()
        return self._host.cpu()


class QuotientOptimizer(torch.optim.Optimizer):
    """Common machinery: group validation, views, lazy state, guarded commits, state_dict.

    Subclasses define ``_init_state(group, tensors)``, ``_hyperparameters(group)`` and the pure
    updates ``_plain_update`` / ``_bundle_update`` (``quotopt.optim.functional``).
    """

    def __init__(self, params, defaults: dict, nonfinite: str = "raise"):
        if nonfinite not in _NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {_NONFINITE_MODES}, got {nonfinite!r}")
        dress_every = defaults.get("dress_every")
        if dress_every is not None and (not isinstance(dress_every, int) or dress_every < 1):
            raise ValueError(f"dress_every must be None or a positive integer, got {dress_every!r}")
        self.nonfinite = nonfinite
        self._pending: list[tuple[torch.Tensor, list[str]]] = []
        super().__init__(params, defaults)

    # ---- groups -----------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        index = len(self.param_groups)
        param_group.setdefault("name", f"param group {index}")
        param_group.setdefault("dress_clock", 0)
        bundle = param_group.get("bundle")
        if bundle is not None:
            if not isinstance(bundle, Bundle):
                raise ValueError(
                    f"{param_group['name']}: 'bundle' must be a manifolds.Bundle, "
                    f"got {type(bundle).__name__}"
                )
            layout = param_group.get("layout")
            if layout is not None and not callable(layout):
                raise ValueError(f"{param_group['name']}: 'layout' must be callable")
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            point = self._views(param_group, params)
            try:
                bundle.check_point(point)
            except ValueError as error:
                raise ValueError(f"{param_group['name']}: {error}") from None
        super().add_param_group(param_group)

    @staticmethod
    def _views(group: dict, tensors: list) -> tuple[torch.Tensor, ...]:
        layout: Callable | None = group.get("layout")
        return tuple(layout(tensors)) if layout is not None else tuple(tensors)

    # ---- state_dict: bundles are structure, not state -----------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        for group in state["param_groups"]:
            if group.get("bundle") is not None:
                group["bundle"] = repr(group["bundle"])
            group.pop("layout", None)
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(saved_groups)} param groups, this optimiser has "
                f"{len(self.param_groups)}"
            )
        for saved, current in zip(saved_groups, self.param_groups):
            expected = repr(current["bundle"]) if current.get("bundle") is not None else None
            if saved.get("bundle") != expected:
                raise ValueError(
                    f"{current['name']}: state_dict was saved for bundle {saved.get('bundle')}, "
                    f"this group has {expected}"
                )
        structure = [{k: g.get(k) for k in _STRUCTURAL_KEYS} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keys in zip(self.param_groups, structure):
            group.update(keys)

    # ---- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One step for every group; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.raise_if_nonfinite(wait=False)
        writes: list[tuple[list[torch.Tensor], list[torch.Tensor], str]] = []
        with unchecked():
            for group in self.param_groups:
                if group.get("bundle") is not None:
                    writes.extend(self._bundle_group_step(group))
                else:
                    writes.extend(self._plain_group_step(group))
        self._commit(writes)
        return loss

    def _bundle_group_step(self, group: dict):
        params = list(group["params"])
        if all(p.grad is None for p in params):
            return []
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"{group['name']}: sparse gradients are not supported")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        point, grad = self._views(group, params), self._views(group, grads)
        state = self.state[params[0]]
        if not state:
            state.update(self._init_state(group, point))
        every = group["dress_every"]
        dress = every is not None and group["dress_clock"] % every == 0
        group["dress_clock"] += 1
        new_point, new_state = self._update(group, point, grad, dict(state), dress)
        layout = group.get("layout")
        after = None
        if getattr(layout, "needs_scatter", False):
            after = lambda: layout.scatter(params, point)  # noqa: E731 - coordinates are copies
        return [self._write_plan(list(point), list(new_point), group["name"], after)] + [
            self._state_plan(state, key, value, group["name"]) for key, value in new_state.items()
        ]

    def _plain_group_step(self, group: dict):
        writes = []
        for param in group["params"]:
            if param.grad is None:
                continue
            if param.grad.is_sparse:
                raise ValueError(f"{group['name']}: sparse gradients are not supported")
            state = self.state[param]
            if not state:
                state.update(self._init_state(group, (param,)))
            new, new_state = self._update(group, (param,), (param.grad,), dict(state), False)
            writes.append(self._write_plan([param], list(new), group["name"]))
            writes.extend(
                self._state_plan(state, k, v, group["name"]) for k, v in new_state.items()
            )
        return writes

    @staticmethod
    def _write_plan(targets, values, name, after=None):
        """Copy ``values`` into ``targets``, then call ``after`` (a layout's scatter)."""
        return (list(targets), list(values), name, after)

    @staticmethod
    def _state_plan(state: dict, key: str, value, name: str):
        """Targets and values for one state entry (a tensor or a tuple of tensors)."""
        if isinstance(value, tuple):
            return (list(state[key]), list(value), name, None)
        return ([state[key]], [value], name, None)

    def _commit(self, writes) -> None:
        if not writes:
            return
        # A NaN or inf anywhere makes the tensor's sum non-finite: one reduction per tensor and
        # one isfinite over the sums, instead of an isfinite pass over every element. (A finite
        # tensor whose sum overflows is refused too: such a step is useless anyway.)
        finite = torch.stack([v.sum().isfinite() for _, values, *_ in writes for v in values])
        names = [name for _, values, name, _ in writes for _ in values]
        on_host = finite.device.type == "cpu"
        if on_host:
            if not bool(finite.all()):
                if self.nonfinite == "raise":
                    bad = names[int((~finite).nonzero()[0, 0])]
                    raise NonFiniteStepError(
                        f"{bad}: the step produced non-finite values (non-finite gradients or a "
                        "rank-deficient point); parameters and optimiser state are unchanged"
                    )
                return
            for targets, values, _, after in writes:
                for target, value in zip(targets, values):
                    target.copy_(value)
                if after is not None:
                    after()
            return
        ok = finite.all()
        for targets, values, _, after in writes:
            for target, value in zip(targets, values):
                target.copy_(torch.where(ok, value, target))
            if after is not None:
                after()
        if self.nonfinite == "raise":
            self._pending.append(_FlagCopy(finite, names))

    def raise_if_nonfinite(self, wait: bool = True) -> None:
        """Raise ``NonFiniteStepError`` if an earlier (skipped) accelerator step was non-finite.

        With ``wait=False`` (what ``step()`` uses) only flags that have already reached the
        host are inspected, so nothing blocks; ``wait=True`` waits for all of them.
        """
        pending, self._pending = self._pending, []
        for index, flags in enumerate(pending):
            if not (wait or flags.ready()):
                self._pending.extend(pending[index:])
                return
            finite, names = flags.host(), flags.names
            if not bool(finite.all()):
                bad = names[int((~finite).nonzero()[0, 0])]
                raise NonFiniteStepError(
                    f"{bad}: an earlier step produced non-finite values and was skipped; "
                    "parameters and optimiser state are unchanged"
                )

    # ---- to be defined by subclasses -------------------------------------------------------
    def _init_state(self, group: dict, point: tuple) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hyperparameters(self, group: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _update(self, group, point, grad, state, dress):
        """Dispatch to the subclass's pure update: ``_bundle_update`` on bundle groups,
        ``_plain_update`` (torch's rule, one tensor) elsewhere."""
        hyper = self._hyperparameters(group)
        bundle = group.get("bundle")
        if bundle is None:
            new, new_state = self._plain_update(point[0], grad[0], state, **hyper)
            return (new,), new_state
        return self._bundle_update(bundle, point, grad, state, dress=dress, **hyper)

    @staticmethod
    def _zero_step(reference: torch.Tensor) -> torch.Tensor:
        """The step counter: a float64 scalar on the parameters' device (exact bias
        corrections, no host synchronisation)."""
        return torch.zeros((), dtype=torch.float64, device=reference.device)
