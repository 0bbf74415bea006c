"""The commit guard of the quotient optimisers: a step is written only when it is finite.

Every group's step is computed out of place into a ``Plan`` (targets, new values, what to do
once committed). ``Guard.commit`` checks all new values at once — one reduction per tensor and
one host read per step on the CPU; on accelerators the writes are masked with ``torch.where``
and the flags copied to the host without blocking, to be inspected at the next step — and only
then copies values, creates lazily initialised state and advances clocks.

A step that is not finite writes nothing in any group. With ``nonfinite="raise"`` it is a
``NonFiniteStepError``; with ``"skip"`` it is counted against the group whose values were not
finite (``Guard.skipped``) and reported with a ``SkippedStepWarning``. On the CPU both name the
heads at fault (``Plan.explain``); on accelerators, whose flags arrive a step later, the group.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = [
    "NonFiniteStepError",
    "RankDeficiencyWarning",
    "SkippedStepWarning",
    "Plan",
    "FlagCopy",
    "Guard",
    "head_flags",
    "warn_dead_heads",
]

_MODES = ("raise", "skip")


class NonFiniteStepError(ValueError):
    """A step produced non-finite parameters or state, or a factorisation inside it failed;
    nothing was written (parameters, state and clocks are as before the step)."""


class RankDeficiencyWarning(UserWarning):
    """A head of a bundle group lost rank during training (its Grams became singular to
    working precision): the quotient is singular there and the head is no longer re-dressed."""


class SkippedStepWarning(UserWarning):
    """A step was skipped (``nonfinite="skip"``): it would have written non-finite values, or a
    factorisation inside it failed; nothing was written. ``skipped_steps()`` counts them."""


@dataclass
class Plan:
    """What one group's step writes: ``targets[i].copy_(values[i])`` (the parameters), the new
    state entries (rebound, not copied: ``state[key] = value``), then ``on_commit``.

    ``checked``: the new values whose finiteness decides the step — the parameters, and the
    state entries a non-finite value could hide in without reaching them (Adam's second moment:
    an infinite v makes the step zero). ``watch``: extra boolean flags (per head: lost rank)
    read with the finiteness flags, each with the message to warn with. ``explain``: called
    only when the step is not finite, says where (e.g. " in heads [1] (non-finite gradient)").
    """

    name: str
    targets: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    states: list[tuple[dict, dict]] = field(default_factory=list)
    checked: list[torch.Tensor] = field(default_factory=list)
    on_commit: list[Callable[[torch.Tensor | None], None]] = field(default_factory=list)
    watch: list[tuple[torch.Tensor, Callable[[list[int]], str]]] = field(default_factory=list)
    explain: Callable[[], str] | None = None

    def write(self, targets, values) -> None:
        self.targets.extend(targets)
        self.values.extend(values)
        self.checked.extend(values)

    def update_state(self, state: dict, new_state: dict, checked_keys) -> None:
        self.states.append((state, new_state))
        for key in checked_keys:
            if key not in new_state:  # optimisers with several rules have several state kinds
                continue
            value = new_state[key]
            self.checked.extend(value if isinstance(value, tuple) else (value,))

    def where(self) -> str:
        if self.explain is not None:
            return self.explain()
        return " (non-finite gradients, or a step too large for the parameters' precision)"


class FlagCopy:
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


def finiteness(plans: list[Plan]) -> tuple[torch.Tensor, list[str]]:
    """One flag per new value (its sum is finite) and the group name of each.

    A NaN or inf anywhere makes the sum non-finite: one reduction per tensor instead of an
    elementwise isfinite pass (a finite tensor whose sum overflows is refused too: such a step
    is useless anyway)."""
    sums = [v.sum() for plan in plans for v in plan.checked]
    names = [plan.name for plan in plans for _ in plan.checked]
    if not sums:  # a rank whose every group failed before its values existed
        return torch.ones(0, dtype=torch.bool), names
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in sums) else torch.float32
    return torch.stack([s.to(dtype) for s in sums]).isfinite(), names


def head_flags(bundle, tensors) -> torch.Tensor | None:
    """Per head of ``bundle`` (numbered as ``bundle.deficient_heads``: a product's components'
    heads one after the other), whether any of ``tensors`` (a point or tangent) is not finite
    there, or its values there sum to an overflow; None for bundles without heads.
    Synchronises: for error messages only."""
    components = getattr(bundle, "components", None)
    if components is not None:  # a product: its components' parts, in order
        parts = bundle.components_of(tensors)
        flags = [head_flags(c, part) for c, part in zip(components, parts)]
        flags = [f for f in flags if f is not None]
        return torch.cat(flags) if flags else None
    if not bundle.per_head:
        return None
    rows = [t.reshape(t.shape[0], -1) for t in tensors]  # (H, ·): a head's slice per row
    # the guard's criterion per head: a value, or the sum of the values, is not finite
    return torch.stack([~(r.isfinite().all(1) & r.sum(1).isfinite()) for r in rows]).any(0)


class Guard:
    """Commits the plans of one step when every checked value is finite; otherwise raises
    (``mode="raise"``) or skips, counts and warns (``"skip"``) — writing nothing either way."""

    def __init__(self, mode: str):
        if mode not in _MODES:
            raise ValueError(f"nonfinite must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.pending: list[FlagCopy] = []
        #: per group name, the steps skipped because that group's values were not finite
        self.skipped: dict[str, int] = {}
        #: the process group of sharded parameters, whose ranks take every decision together
        self.process_group = None

    def fail(self, name: str, what: str) -> None:
        """A step went wrong in group ``name`` (``what``: "the step produced non-finite values
        …"): raise, or count it against the group and warn."""
        if self.mode == "raise":
            raise NonFiniteStepError(
                f"{name}: {what}; parameters and optimiser state are unchanged"
            )
        self.skipped[name] = self.skipped.get(name, 0) + 1
        warnings.warn(
            f"{name}: {what}; the step was skipped and wrote nothing "
            "(optimizer.skipped_steps() counts skipped steps per group)",
            SkippedStepWarning,
            stacklevel=4,
        )

    def commit(self, plans: list[Plan], failures=()) -> None:
        """Write ``plans`` if every value is finite and no ``failures`` ((group name, what):
        factorisations that failed) occurred — on every rank, when sharded."""
        if not plans and not failures:
            return
        finite, names = finiteness(plans)
        watched = [flags for plan in plans for flags, _ in plan.watch]
        elsewhere = None if self.process_group is None else self._agree(finite, failures)
        for name, what in failures:
            self.fail(name, what)
        if failures:
            return
        if elsewhere is not None and finite.device.type == "cpu" and bool(elsewhere):
            if bool(finite.all()):
                there = "non-finite values or a failed factorisation there"
                self.fail(plans[0].name, f"the step failed on another process ({there})")
                return
        elif elsewhere is not None:
            finite = finite & ~elsewhere
        if finite.device.type == "cpu":
            # one host read: bit 0 says some value is non-finite, bit 1 that a head lost rank
            lost = torch.cat([w.reshape(-1) for w in watched]) if watched else finite[:0]
            code = int((~finite.all()).long() + 2 * lost.any().long())
            if code & 1:
                owners = [plan for plan in plans for _ in plan.checked]
                bad = {id(owners[i]): owners[i] for i in (~finite).nonzero().flatten().tolist()}
                for plan in bad.values():  # raise mode raises at the first
                    self.fail(plan.name, f"the step produced non-finite values{plan.where()}")
                return
            for plan in plans:
                for target, value in zip(plan.targets, plan.values):
                    target.copy_(value)
                for state, new_state in plan.states:
                    state.update(new_state)
                for action in plan.on_commit:
                    action(None)
            if code & 2:  # rare: read which heads
                _warn_rank(plans, lost.tolist())
            return
        ok = finite.all()
        for plan in plans:
            for target, value in zip(plan.targets, plan.values):
                target.copy_(torch.where(ok, value, target))
            for state, new_state in plan.states:
                state.update(_masked(ok, new_state, state))
            for action in plan.on_commit:
                action(ok)
        self.pending.append(FlagCopy(finite, names))

    def _agree(self, finite: torch.Tensor, failures) -> torch.Tensor:
        """Whether the step failed on any rank of ``process_group`` (one all-reduce of one
        number, no host read): every rank then refuses it, so shards never diverge."""
        import torch.distributed as dist

        bad = (~finite).any() if finite.numel() else torch.zeros((), dtype=torch.bool)
        flag = (bad | bool(failures)).to(torch.int32).reshape(1)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.process_group)
        return flag[0].bool()

    def read_pending(self, wait: bool) -> None:
        """Inspect the accelerator flags of earlier steps: only those already on the host, or
        (``wait``) all of them; a non-finite one raises or is counted as skipped."""
        pending, self.pending = self.pending, []
        for index, flags in enumerate(pending):
            if not (wait or flags.ready()):
                self.pending.extend(pending[index:])
                return
            finite, names = flags.host(), flags.names
            bad = dict.fromkeys(names[i] for i in (~finite).nonzero().flatten().tolist())
            for name in bad:
                self.fail(name, "an earlier step produced non-finite values and was not written")


def _masked(ok: torch.Tensor, new: dict, old: dict) -> dict:
    """``new`` where ``ok``, else ``old``, entry by entry (tensors or tuples of tensors)."""

    def pick(a, b):
        if isinstance(a, tuple):
            return tuple(pick(x, y) for x, y in zip(a, b))
        return torch.where(ok, a, b)

    return {key: pick(value, old[key]) for key, value in new.items()}


def _warn_rank(plans: list[Plan], flags: list[bool]) -> None:
    start = 0
    for plan in plans:
        for lost, message in plan.watch:
            count = lost.numel()
            heads = [i for i, bad in enumerate(flags[start : start + count]) if bad]
            start += count
            if heads:
                warnings.warn(message(heads), RankDeficiencyWarning, stacklevel=5)


def warn_dead_heads(group: dict, point) -> None:
    """A ``RankDeficiencyWarning`` naming the group and the heads of a bundle group whose
    factors are all zero (``bundle.dead_heads``): no gradient step moves them. Reads the flags
    on the host: for ``add_param_group``, never inside a step."""
    dead = group["bundle"].dead_heads(point)
    heads = [] if dead is None else torch.nonzero(dead.reshape(-1)).flatten().tolist()
    if heads:
        warnings.warn(
            f"{group['name']}: heads {heads} of {group['bundle']!r} have every factor zero, a "
            "critical point of every loss that no step leaves; initialise at least one factor "
            "of each head (LoRA: A random, B = 0)",
            RankDeficiencyWarning,
            stacklevel=3,
        )
