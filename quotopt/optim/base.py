"""The stateful shell shared by QuotientSGD, QuotientAdam and QuotientMuon.

A param group with a ``"bundle"`` key (a ``manifolds.Bundle``) is updated on the bundle's
quotient; its ``"params"`` are either the bundle's point, in order, or the model's own
parameters together with a ``"layout"``: a callable mapping a list of tensors shaped like the
params (the params themselves, or their gradients) to views in the bundle's point order. Writes
go through those views (and the layout's ``write_back`` where it has one), so fused or
transposed storage (``nn.MultiheadAttention``'s ``in_proj_weight``, ``nn.Linear``'s (out, in)
weights) is updated in place.

The contract of ``step()``: steps are computed out of place and committed only when every new
value is finite (``quotopt.optim.guard``). Anything that goes numerically wrong — non-finite
values, a factorisation that fails — is a ``NonFiniteStepError`` naming the group and, on the
CPU, the heads at fault (or, with ``nonfinite="skip"``, a skipped step: a
``SkippedStepWarning``, counted per group by ``skipped_steps()``), and leaves parameters,
state, lazily created state and clocks exactly as they were. Heads that lose rank during
training are reported with a ``RankDeficiencyWarning`` naming group and head (on the CPU at
once; on accelerators, whose flags are read without blocking, through
``rank_deficient_heads()``).

Freezing: a group with ``"frozen": True`` is never stepped, whatever its learning rate (a
scheduler that sets every group's lr cannot move it); the key biases that softmax ignores are
such groups (``quotopt.symmetries``). Bundle groups whose parameters all have
``requires_grad=False`` are never changed; a bundle group frozen in part — at construction or
later — is refused, naming the parameter, since a quotient step moves all its tensors together.

Each bundle group keeps the factorisation of its point (``bundle.factorise``) between steps:
the step that moves the point computes the new one, and the next step reuses it as long as the
parameters were not modified in between (tracked by their version counters: every in-place
write — ``copy_`` under ``no_grad``, ``load_state_dict``, ``torch.nn.init`` — is seen). Writes
through ``param.data`` bypass version counters: after such a write call
``forget_factorisations()``.
"""

from __future__ import annotations

import torch

from manifolds import Bundle, unchecked

from . import sharding, stacking
from . import validation as rules
from .checkpointing import Checkpointing
from .diagnostics import Diagnostics
from .guard import (
    Guard,
    NonFiniteStepError,
    Plan,
    RankDeficiencyWarning,
    SkippedStepWarning,
    warn_dead_heads,
)
from .protocol import UpdateRule
from .sharding import Shards, local, sharded_group
from .stacking import Member
from .validation import check_freezing as _check_freezing

__all__ = [
    "QuotientOptimizer",
    "NonFiniteStepError",
    "RankDeficiencyWarning",
    "SkippedStepWarning",
]


def _versions(tensors) -> tuple[int, ...]:
    return tuple(local(t)._version for t in tensors)  # a shard's writes count


class QuotientOptimizer(UpdateRule, Diagnostics, Checkpointing, torch.optim.Optimizer):
    """The shell of every quotient optimiser: group validation, views, lazy state, stacking,
    guarded commits, state_dict (module docstring). A subclass implements the hooks of
    ``quotopt.optim.protocol.UpdateRule`` — its rule — and nothing else of the step; a
    subclass that leaves one out cannot be instantiated."""

    def __init__(self, params, defaults: dict, nonfinite: str = "raise"):
        self._guard = Guard(nonfinite)
        self._frames: dict[int, tuple[tuple[int, ...], object]] = {}
        self._deficient: dict[int, object] = {}
        super().__init__(params, defaults)
        if self._guard.process_group is not None:
            self.init_state()

    def init_state(self) -> None:
        """Create now the state each group's first step would create (zeros; steps taken from
        there are the same). Sharded optimisers do this when built. Call it before
        ``torch.distributed.checkpoint``'s ``set_optimizer_state_dict`` on an optimiser that has
        not stepped: that function otherwise initialises the state by a step at zero gradient
        and lr = 0, which re-dresses the parameters of bundle groups."""
        sharding.create_state(self)

    @property
    def nonfinite(self) -> str:
        """``"raise"`` or ``"skip"``: what a step that is not finite does."""
        return self._guard.mode

    # ---- groups -----------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        index = len(self.param_groups)
        param_group = dict(param_group)
        param_group.setdefault("name", f"param group {index}")
        for key, value in self.defaults.items():
            param_group.setdefault(key, value)
        self.validate_group(param_group["name"], param_group)
        param_group.setdefault("dress_clock", 0)
        param_group.setdefault("frame_age", None)  # the state's frame bases: none yet
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
        param_group["params"] = params
        if sharded_group(params):  # FSDP2: stepped on the local shards
            param_group["shards"] = self._shards(param_group, params)
            bundle = param_group.get("bundle")
        if bundle is not None:
            name = param_group["name"]
            _check_freezing(name, params, "when the optimiser is built")
            try:
                bundle.check_point(self._views(param_group, params))
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
        super().add_param_group(param_group)
        if bundle is not None:  # heads with every factor zero never move: say so once, here
            group = self.param_groups[-1]
            warn_dead_heads(group, self._views(group, params))

    def validate_group(self, name: str, group: dict) -> None:
        """Every rule on a group's hyperparameters (``ValueError`` naming group, rule and
        value): the optimiser's own, and the flags all share — ``maximize``, ``nesterov`` and
        ``frozen`` are True or False (a string such as "no" would silently mean True)."""
        self._check_hyperparameters(name, group)
        for key in ("maximize", "nesterov", "frozen"):
            if key in group:
                rules.boolean(name, key, group[key])

    def _shards(self, group: dict, params: list) -> Shards:
        """The group's sharding (``quotopt.optim.sharding``); all groups share one mesh, whose
        ranks agree on every step's commit (``Guard.process_group``)."""
        shards = Shards(group["name"], group, params)
        if self._guard.process_group not in (None, shards.process_group):
            raise ValueError(f"{group['name']}: every sharded group must use one device mesh")
        self._guard.process_group = shards.process_group
        if shards.bundle is not None:
            group["bundle"] = shards.bundle  # the geometry of the local shards
        return shards

    @staticmethod
    def _views(group: dict, tensors: list) -> tuple[torch.Tensor, ...]:
        if "shards" in group:
            return group["shards"].views(tensors)
        layout = group.get("layout")
        return tuple(layout(tensors)) if layout is not None else tuple(tensors)

    # ---- the step ------------------------------------------------------------------------
    #: whether bundle groups of one shape are stepped together (``quotopt.optim.stacking``);
    #: a trajectory is the same either way
    stack_groups: bool = True

    @torch.no_grad()
    def step(self, closure=None):
        """One step for every group; returns the closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._guard.read_pending(wait=False)
        plans: list[tuple[int, Plan]] = []  # in group order: errors name the first group
        batches: dict = {}
        failing: list[Member] = []
        failures: list[tuple[str, str]] = []  # sharded: every rank goes on to agree at commit
        index, group = 0, None
        try:
            with unchecked():
                for index, group in enumerate(self.param_groups):
                    self.validate_group(group["name"], group)  # a scheduler may change it
                    if group.get("frozen", False):
                        continue
                    if group.get("bundle") is None:
                        plans.extend((index, p) for p in self._plain_group_step(group))
                        continue
                    member = self._member(index, group)
                    if member is None:
                        continue
                    stack = self.stack_groups and self._stackable(member.hyper)
                    key = stacking.batch_key(member) if stack else None
                    batches.setdefault(("alone", index) if key is None else key, []).append(member)
                for members in (b for group in batches.values() for b in stacking.bounded(group)):
                    failing = members
                    try:
                        steps = self._bundle_batch_step(members)
                    except torch.linalg.LinAlgError as error:
                        if self._guard.process_group is None:
                            raise
                        failures.extend(self._failure(m, group, error) for m in members)
                        continue
                    plans.extend((m.index, p) for m, p in zip(members, steps))
        except torch.linalg.LinAlgError as error:
            for name, what in (self._failure(m, group, error) for m in failing or [None]):
                self._guard.fail(name, what)
            return loss
        plans.sort(key=lambda entry: entry[0])
        self._guard.commit([plan for _, plan in plans], failures)
        return loss

    def _failure(self, member: Member | None, group: dict, error) -> tuple[str, str]:
        """(group name, what) of a factorisation that failed inside the step."""
        message = str(error).splitlines()[0]
        where = "" if member is None else self._explain(member.index, member.group)
        name = group["name"] if member is None else member.group["name"]
        return name, f"a factorisation failed inside the step ({message}){where}"

    def _member(self, index: int, group: dict) -> Member | None:
        """The group's part in this step (None if it has nothing to do): its views, gradient
        views, state (created if new) and hyperparameters."""
        params = list(group["params"])
        name = group["name"]
        _check_freezing(name, params, "since the optimiser was built")
        if all(p.grad is None for p in params) or not params[0].requires_grad:
            return None
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                raise ValueError(f"{name}: sparse gradients are not supported")
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        point, grad = self._views(group, params), self._views(group, grads)
        fresh = params[0] not in self.state
        state = self._initial_state(group, point) if fresh else self.state[params[0]]
        every = group["dress_every"]
        dress = every is not None and group["dress_clock"] % every == 0
        hyper = self._hyperparameters(group)
        return Member(index, group, params, point, grad, state, fresh, hyper, dress)

    def _initial_state(self, group: dict, point: tuple) -> dict:
        """The rule's initial state (``_init_state``) and, where the bundle builds frames from
        the last step's bases (``Bundle.empty_basis``), ``"frame_basis"``: those bases, so
        that a resumed run builds the frames an uninterrupted one would (their age is the
        group's ``"frame_age"``)."""
        state = self._init_state(group, point)
        bundle = group.get("bundle")
        basis = None if bundle is None else bundle.empty_basis(point)
        if basis is not None:
            state["frame_basis"] = basis
        return state

    def _bundle_batch_step(self, members: list[Member]) -> list[Plan]:
        """One update for the ``members`` (one group, or groups that stack), one plan each."""
        key = tuple(m.index for m in members)
        versions = tuple(v for m in members for v in _versions(m.params))
        cached = self._frames.get(key)
        frame = cached[1] if cached is not None and cached[0] == versions else None
        first = members[0]
        if len(members) == 1:
            bundle, point, grad, state = first.bundle, first.point, first.grad, dict(first.state)
        else:
            bundle = first.bundle.stacked(sum(m.heads for m in members))
            point = stacking.gather(members, [m.point for m in members])
            grad = stacking.gather(members, [m.grad for m in members])
            state = stacking.gather_state(members)
        bases = state.pop("frame_basis", None)  # the shell's, not the rule's
        age = first.group.get("frame_age")
        if frame is None and bases is not None and age is not None:  # as the last step built it
            frame = bundle.factorise_from(point, bases, age)
        new_point, new_state, new_frame = self._bundle_update(
            bundle.at(point, frame), grad, state, dress=first.dress, **first.hyper
        )
        moved = None
        if bases is not None:
            moved = new_frame.basis
            if moved is None:  # a frame with nothing to build the next from
                new_state["frame_basis"] = tuple(torch.zeros_like(t) for t in bases)
            else:
                new_state["frame_basis"] = moved[0]
        if len(members) == 1:
            parts, states = [new_point], [new_state]
        else:
            parts = stacking.split(members, new_point)
            states = stacking.split_state(members, new_state)
        deficient = new_frame.deficient
        plans, start = [], 0
        for m, part, member_state in zip(members, parts, states):
            flags = deficient
            if deficient is not None and len(members) > 1:
                flags = deficient[start : start + m.heads]
            start += m.heads
            plans.append(self._member_plan(m, part, member_state, flags, moved))

        def remember(ok: torch.Tensor | None) -> None:  # after every member's writes
            if ok is None:  # values known finite: the new frame is this point's
                now = tuple(v for m in members for v in _versions(m.params))
                self._frames[key] = (now, new_frame.data)
            else:  # masked commit: the frame is known good only where the step was taken
                self._frames.pop(key, None)

        plans[-1].on_commit.append(remember)
        return plans

    def _member_plan(self, m: Member, new_point, new_state: dict, deficient, moved=None) -> Plan:
        """The plan that writes one member's new point and state, and what follows a commit
        (``moved``: the new frame's ``basis``, whose age the group keeps)."""
        group = m.group
        plan = Plan(group["name"])
        plan.write(m.point, new_point)
        plan.update_state(m.state, new_state, self._checked_state)

        def on_commit(ok: torch.Tensor | None) -> None:
            shards = group.get("shards")
            layout = group.get("layout") if shards is None else shards.layout
            if hasattr(layout, "write_back"):
                layout.write_back([local(p) for p in m.params], m.point)
            if m.fresh:
                self.state[m.params[0]] = m.state
            group["dress_clock"] += 1
            if "frame_basis" in new_state:
                group["frame_age"] = None if moved is None else moved[1]

        plan.on_commit.append(on_commit)
        plan.explain = lambda: self._explain(m.index, group, new_point)
        if deficient is not None:
            self._watch_rank(m.index, group, group["bundle"], deficient, plan)
        return plan

    def _plain_group_step(self, group: dict) -> list[Plan]:
        keys = [p for p in group["params"] if p.grad is not None]
        if not keys:
            return []
        if any(p.grad.is_sparse for p in keys):
            raise ValueError(f"{group['name']}: sparse gradients are not supported")
        params, grads = [local(p) for p in keys], [local(p.grad) for p in keys]  # shards
        states = [
            self.state[k] if k in self.state else self._init_state(group, (p,))
            for k, p in zip(keys, params)
        ]
        created = {k: s for k, s in zip(keys, states) if k not in self.state}
        hyper = self._hyperparameters(group)
        if "shards" in group and self._gathers_matrices(group):
            hyper["gather"] = [group["shards"].matrix(k) for k in keys]
        plan = Plan(group["name"])
        planned = None
        if self._plain_in_place is not None:  # new parameters held or none, state at commit
            planned = self._plain_in_place(params, grads, states, **hyper)
        if planned is not None:
            new_params, checks, commit = planned
            if new_params:  # else formed in place at commit
                plan.write(params, new_params)
            plan.checked.extend(checks)
            plan.on_commit.append(commit)
        else:
            new_params, new_states = self._plain_update(params, grads, states, **hyper)
            plan.write(params, new_params)
            for state, new_state in zip(states, new_states):
                plan.update_state(state, new_state, self._checked_state)
        if created:
            plan.on_commit.append(lambda ok: self.state.update(created))
        return [plan]

    def forget_factorisations(self) -> None:
        """Drop the cached factorisations (needed only after writing parameters through
        ``.data``, which version counters do not see)."""
        self._frames.clear()
