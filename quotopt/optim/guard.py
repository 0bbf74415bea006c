"""The commit guard of the quotient optimisers: a step is written only when it is finite.

Every group's step is computed out of place into a ``Plan`` (targets, new values, what to do
once committed). ``commit`` checks all new values at once — one reduction per tensor and one
host read per step on the CPU; on accelerators the writes are masked with ``torch.where`` and
the flags copied to the host without blocking, to be inspected at the next step — and only then
copies values, creates lazily initialised state and advances clocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

__all__ = ["NonFiniteStepError", "Plan", "FlagCopy"]


class NonFiniteStepError(ValueError):
    """A step produced non-finite parameters or state, or a factorisation inside it failed;
    nothing was written (parameters, state and clocks are as before the step)."""


@dataclass
class Plan:
    """What one group's step writes: ``targets[i].copy_(values[i])`` (the parameters), the new
    state entries (rebound, not copied: ``state[key] = value``), then ``on_commit``.

    ``checked``: the new values whose finiteness decides the step — the parameters, and the
    state entries a non-finite value could hide in without reaching them (Adam's second moment:
    an infinite v makes the step zero). ``watch``: extra boolean flags (per head: lost rank)
    read with the finiteness flags, each with the message to warn with.
    """

    name: str
    targets: list[torch.Tensor] = field(default_factory=list)
    values: list[torch.Tensor] = field(default_factory=list)
    states: list[tuple[dict, dict]] = field(default_factory=list)
    checked: list[torch.Tensor] = field(default_factory=list)
    on_commit: list[Callable[[torch.Tensor | None], None]] = field(default_factory=list)
    watch: list[tuple[torch.Tensor, Callable[[list[int]], str]]] = field(default_factory=list)

    def write(self, targets, values) -> None:
        self.targets.extend(targets)
        self.values.extend(values)
        self.checked.extend(values)

    def update_state(self, state: dict, new_state: dict, checked_keys) -> None:
        self.states.append((state, new_state))
        for key in checked_keys:
            value = new_state[key]
            self.checked.extend(value if isinstance(value, tuple) else (value,))


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
    flags = [v.sum().isfinite() for plan in plans for v in plan.checked]
    names = [plan.name for plan in plans for _ in plan.checked]
    return torch.stack(flags), names
