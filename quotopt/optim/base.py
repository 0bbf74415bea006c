"""The stateful shell shared by QuotientSGD and QuotientAdam.

A param group with a ``"bundle"`` key (a ``manifolds.Bundle``) is updated on the bundle's
quotient; its ``"params"`` are either the bundle's point, in order, or the model's own
parameters together with a ``"layout"``: a callable mapping a list of tensors shaped like the
params (the params themselves, or their gradients) to views in the bundle's point order. Writes
go through those views (and the layout's ``write_back`` where it has one), so fused or
transposed storage (``nn.MultiheadAttention``'s ``in_proj_weight``, ``nn.Linear``'s (out, in)
weights) is updated in place.

The contract of ``step()``: steps are computed out of place and committed only when every new
value is finite (``quotopt.optim.guard``). Anything that goes numerically wrong — non-finite
values, a factorisation that fails — is a ``NonFiniteStepError`` naming the group (or, with
``nonfinite="skip"``, a skipped step), and leaves parameters, state, lazily created state and
clocks exactly as they were. Heads that lose rank during training are reported with a
``RankDeficiencyWarning`` naming group and head (on the CPU at once; on accelerators, whose
flags are read without blocking, through ``rank_deficient_heads()``). Bundle groups whose
parameters have ``requires_grad=False`` are never changed.

Each bundle group keeps the factorisation of its point (``bundle.factorise``) between steps:
the step that moves the point computes the new one, and the next step reuses it as long as the
parameters were not modified in between (tracked by their version counters: every in-place
write — ``copy_`` under ``no_grad``, ``load_state_dict``, ``torch.nn.init`` — is seen). Writes
through ``param.data`` bypass version counters: after such a write call
``forget_factorisations()``.
"""

from __future__ import annotations

import warnings

import torch

from manifolds import Bundle, unchecked

from .guard import FlagCopy, NonFiniteStepError, Plan, finiteness
from .validation import check_state_dict

__all__ = ["QuotientOptimizer", "NonFiniteStepError", "RankDeficiencyWarning"]

_NONFINITE_MODES = ("raise", "skip")
_STRUCTURAL_KEYS = ("bundle", "layout")
_UNSUPPORTED = ("foreach", "fused", "capturable", "differentiable")


class RankDeficiencyWarning(UserWarning):
    """A head of a bundle group lost rank during training (its Grams became singular to
    working precision): the quotient is singular there and the head is no longer re-dressed."""


def _reject_unsupported(cls_name: str, options: dict) -> None:
    for name, value in options.items():
        if value not in (None, False):
            raise ValueError(
                f"{cls_name} does not implement {name}={value!r}; its steps are already batched "
                "over heads (leave the option unset)"
            )


def _masked(ok: torch.Tensor, new: dict, old: dict) -> dict:
    """``new`` where ``ok``, else ``old``, entry by entry (tensors or tuples of tensors)."""

    def pick(a, b):
        if isinstance(a, tuple):
            return tuple(pick(x, y) for x, y in zip(a, b))
        return torch.where(ok, a, b)

    return {key: pick(value, old[key]) for key, value in new.items()}


def _versions(tensors) -> tuple[int, ...]:
    return tuple(t._version for t in tensors)


class QuotientOptimizer(torch.optim.Optimizer):
    """Common machinery: group validation, views, lazy state, guarded commits, state_dict.

    Subclasses define ``_init_state(group, tensors)``, ``_hyperparameters(group)``, the rules
    ``_check_hyperparameters(name, group)`` (with ``quotopt.optim.validation``) and the pure
    updates ``_plain_update`` / ``_bundle_update`` (``quotopt.optim.functional``).
    """

    def __init__(self, params, defaults: dict, nonfinite: str = "raise"):
        if nonfinite not in _NONFINITE_MODES:
            raise ValueError(f"nonfinite must be one of {_NONFINITE_MODES}, got {nonfinite!r}")
        self.nonfinite = nonfinite
        self._pending: list[FlagCopy] = []
        self._frames: dict[int, tuple[tuple[int, ...], object]] = {}
        self._deficient: dict[int, object] = {}
        super().__init__(params, defaults)

    # ---- groups -----------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        index = len(self.param_groups)
        param_group = dict(param_group)
        param_group.setdefault("name", f"param group {index}")
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self._check_hyperparameters(param_group["name"], param_group)
        param_group.setdefault("dress_clock", 0)
        bundle = param_group.get("bundle")
        if bundle is not None:
            name = param_group["name"]
            if not isinstance(bundle, Bundle):
                raise ValueError(
                    f"{name}: 'bundle' must be a manifolds.Bundle, got {type(bundle).__name__}"
                )
            layout = param_group.get("layout")
            if layout is not None and not callable(layout):
                raise ValueError(f"{name}: 'layout' must be callable")
            params = param_group["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            frozen = [i for i, p in enumerate(params) if not p.requires_grad]
            if frozen and len(frozen) < len(params):
                raise ValueError(
                    f"{name}: params {frozen} have requires_grad=False but the others do not; a "
                    "quotient step moves every tensor of a bundle together — freeze the whole "
                    "group or none of it"
                )
            try:
                bundle.check_point(self._views(param_group, params))
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        super().add_param_group(param_group)

    @staticmethod
    def _views(group: dict, tensors: list) -> tuple[torch.Tensor, ...]:
        layout = group.get("layout")
        return tuple(layout(tensors)) if layout is not None else tuple(tensors)

    # ---- state_dict: bundles are structure, not state -----------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        for group in state["param_groups"]:
            if group.get("bundle") is not None:
                group["bundle"] = repr(group["bundle"])
            group.pop("layout", None)
        state["optimizer"] = type(self).__name__
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict``; every mismatch (optimiser class, groups, bundles,
        state keys, tensor shapes) is refused with a ValueError before anything is written."""
        check_state_dict(self, state_dict)
        structure = [{k: g.get(k) for k in _STRUCTURAL_KEYS} for g in self.param_groups]
        state_dict = {k: v for k, v in state_dict.items() if k != "optimizer"}
        super().load_state_dict(state_dict)
        for group, keys in zip(self.param_groups, structure):
            group.update(keys)
        self._frames.clear()
        self._deficient.clear()

    def expected_state(self, group: dict) -> dict:
        """The state a fresh step would create for ``group`` (shapes and dtypes to check a
        loaded state against), keyed like ``self.state`` entries."""
        params = list(group["params"])
        if group.get("bundle") is not None:
            with unchecked():
                return {id(params[0]): self._init_state(group, self._views(group, params))}
        return {id(p): self._init_state(group, (p,)) for p in params}

    # ---- the step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One step for every group; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.raise_if_nonfinite(wait=False)
        plans: list[Plan] = []
        group = None
        try:
            with unchecked():
                for index, group in enumerate(self.param_groups):
                    self._check_hyperparameters(group["name"], group)  # a scheduler may change it
                    if group.get("bundle") is not None:
                        plans.extend(self._bundle_group_step(index, group))
                    else:
                        plans.extend(self._plain_group_step(group))
        except torch.linalg.LinAlgError as error:
            if self.nonfinite == "skip":
                return loss
            message = str(error).splitlines()[0]
            raise NonFiniteStepError(
                f"{group['name']}: a factorisation failed inside the step ({message}); "
                "parameters and optimiser state are unchanged"
            ) from None
        self._commit(plans)
        return loss

    def _bundle_group_step(self, index: int, group: dict) -> list[Plan]:
        params = list(group["params"])
        name = group["name"]
        if all(p.grad is None for p in params) or not all(p.requires_grad for p in params):
            return []
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"{name}: sparse gradients are not supported")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        point, grad = self._views(group, params), self._views(group, grads)
        bundle = group["bundle"]
        fresh = params[0] not in self.state
        state = self._init_state(group, point) if fresh else self.state[params[0]]
        every = group["dress_every"]
        dress = every is not None and group["dress_clock"] % every == 0
        cached = self._frames.get(index)
        frame = cached[1] if cached is not None and cached[0] == _versions(params) else None
        hyper = self._hyperparameters(group)
        new_point, new_state, new_frame = self._bundle_update(
            bundle, point, grad, dict(state), dress=dress, frame=frame, **hyper
        )
        plan = Plan(name)
        plan.write(point, new_point)
        plan.update_state(state, new_state, self._checked_state)

        def on_commit(ok: torch.Tensor | None) -> None:
            layout = group.get("layout")
            if hasattr(layout, "write_back"):
                layout.write_back(params, point)
            if fresh:
                self.state[params[0]] = state
            group["dress_clock"] += 1
            if ok is None:  # values are known to be finite: the new frame is this point's
                self._frames[index] = (_versions(params), new_frame)
            else:  # masked commit: the frame is known good only where the step was taken
                self._frames.pop(index, None)

        plan.on_commit.append(on_commit)
        self._watch_rank(index, group, bundle, new_frame, plan)
        return [plan]

    def _watch_rank(self, index, group, bundle, frame, plan: Plan) -> None:
        """Flag heads that were full rank before this step and are not after it."""
        now = bundle.deficient_heads(frame)
        if now is None:
            return
        before = self._deficient.get(index)
        plan.on_commit.append(lambda ok: self._deficient.__setitem__(index, now))
        if before is None or before.shape != now.shape:
            return
        lost = now & ~before

        def message(heads: list[int]) -> str:
            return (
                f"{group['name']}: heads {heads} of {bundle!r} lost rank (their factor Grams "
                "are singular to working precision); they are no longer re-dressed"
            )

        plan.watch.append((lost, message))

    def _plain_group_step(self, group: dict) -> list[Plan]:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return []
        if any(p.grad.is_sparse for p in params):
            raise ValueError(f"{group['name']}: sparse gradients are not supported")
        states = [
            self.state[p] if p in self.state else self._init_state(group, (p,)) for p in params
        ]
        created = {p: s for p, s in zip(params, states) if p not in self.state}
        new_params, new_states = self._plain_update(
            params, [p.grad for p in params], states, **self._hyperparameters(group)
        )
        plan = Plan(group["name"])
        plan.write(params, new_params)
        for state, new_state in zip(states, new_states):
            plan.update_state(state, new_state, self._checked_state)
        if created:
            plan.on_commit.append(lambda ok: self.state.update(created))
        return [plan]

    def _commit(self, plans: list[Plan]) -> None:
        if not plans:
            return
        finite, names = finiteness(plans)
        watched = [flags for plan in plans for flags, _ in plan.watch]
        if finite.device.type == "cpu":
            # one host read: bit 0 says some value is non-finite, bit 1 that a head lost rank
            lost = torch.cat([w.reshape(-1) for w in watched]) if watched else finite[:0]
            code = int((~finite.all()).long() + 2 * lost.any().long())
            if code & 1:
                if self.nonfinite == "raise":
                    bad = names[int((~finite).nonzero()[0, 0])]
                    raise NonFiniteStepError(
                        f"{bad}: the step produced non-finite values (non-finite gradients or a "
                        "rank-deficient point); parameters and optimiser state are unchanged"
                    )
                return
            for plan in plans:
                for target, value in zip(plan.targets, plan.values):
                    target.copy_(value)
                for state, new_state in plan.states:
                    state.update(new_state)
                for action in plan.on_commit:
                    action(None)
            if code & 2:  # rare: read which heads
                self._warn_rank(plans, lost.tolist())
            return
        ok = finite.all()
        for plan in plans:
            for target, value in zip(plan.targets, plan.values):
                target.copy_(torch.where(ok, value, target))
            for state, new_state in plan.states:
                state.update(_masked(ok, new_state, state))
            for action in plan.on_commit:
                action(ok)
        if self.nonfinite == "raise":
            self._pending.append(FlagCopy(finite, names))

    @staticmethod
    def _warn_rank(plans: list[Plan], flags: list[bool]) -> None:
        start = 0
        for plan in plans:
            for lost, message in plan.watch:
                count = lost.numel()
                heads = [i for i, bad in enumerate(flags[start : start + count]) if bad]
                start += count
                if heads:
                    warnings.warn(message(heads), RankDeficiencyWarning, stacklevel=4)

    def forget_factorisations(self) -> None:
        """Drop the cached factorisations (needed only after writing parameters through
        ``.data``, which version counters do not see)."""
        self._frames.clear()

    def rank_deficient_heads(self) -> dict[str, list[int]]:
        """Per bundle group (by name), the heads whose factor Grams were singular to working
        precision at the last committed step (reads device flags: synchronises)."""
        out = {}
        for index, flags in self._deficient.items():
            heads = torch.nonzero(flags.reshape(-1)).flatten().tolist()
            if heads:
                out[self.param_groups[index]["name"]] = heads
        return out

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
    #: state entries whose finiteness the guard checks besides the parameters
    _checked_state: tuple[str, ...] = ()

    def _init_state(self, group: dict, point: tuple) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _hyperparameters(self, group: dict) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def _check_hyperparameters(self, name: str, group: dict) -> None:  # pragma: no cover
        raise NotImplementedError

    @staticmethod
    def _zero_step(reference: torch.Tensor) -> torch.Tensor:
        """The step counter: a float64 scalar on the parameters' device (exact bias
        corrections, no host synchronisation)."""
        return torch.zeros((), dtype=torch.float64, device=reference.device)
