"""The one list of detectors that ``quotopt.symmetries`` walks, in order.

A ``Detector`` is a name and one function, ``find(path, module, request)``, called on every
module of the model (``path`` ends with a dot, or is empty for the model itself; ``request`` a
``quotopt.groups.candidates.Request``). A detector that *proposes* returns ``Slot``\\ s, which
the pipeline verifies before it keeps them; per module the first detector that returns any slot
wins, children before their parents. A detector that *declares* (``declares=True``) returns
groups the module vouches for, taken as they are, on the outermost module where it finds any;
nothing inside that module is detected. Optional hooks: ``example_inputs(model)`` builds one
forward's inputs where the user gives none, ``float64_fix(module)`` names the known fix where a
module's float64 copy does not run, ``finish(groups, request)`` rewrites the accepted groups (LoRA
stacks its pairs by shape).

Adding a source of structure is one ``register(Detector(...))``; ``unregister(name)`` removes it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Detector", "detectors", "register", "unregister"]


@dataclass(frozen=True)
class Detector:
    """A source of structure: ``find(path, module, request)`` returns slots (or, with
    ``declares``, groups); the optional hooks are described in the module docstring."""

    name: str
    find: Callable
    declares: bool = False
    example_inputs: Callable | None = None
    float64_fix: Callable | None = None
    finish: Callable | None = None


_DETECTORS: list[Detector] = []


def detectors() -> tuple[Detector, ...]:
    """The registered detectors, in the order they are tried."""
    return tuple(_DETECTORS)


def register(detector: Detector, *, before: str | None = None) -> Detector:
    """Add ``detector`` at the end, or just before the one named ``before``; returns it.

    Raises ``ValueError`` if its name is taken or ``before`` names no detector."""
    names = [d.name for d in _DETECTORS]
    if detector.name in names:
        raise ValueError(
            f"detector name {detector.name!r} is already registered; unregister it first or "
            "choose another name"
        )
    if before is None:
        _DETECTORS.append(detector)
        return detector
    if before not in names:
        raise ValueError(f"before={before!r} names no registered detector; one of {names}")
    _DETECTORS.insert(names.index(before), detector)
    return detector


def unregister(name: str) -> Detector:
    """Remove the detector called ``name`` and return it; ``ValueError`` if there is none."""
    for i, detector in enumerate(_DETECTORS):
        if detector.name == name:
            return _DETECTORS.pop(i)
    raise ValueError(
        f"no detector named {name!r} is registered; registered: {[d.name for d in _DETECTORS]}"
    )
