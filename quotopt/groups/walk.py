"""The walk of the registered detectors over a model's modules (``quotopt.groups.registry``).

Declaring detectors first, outermost module first: what a module declares is taken as it is and
nothing inside it is detected. Then the proposing detectors, children before their parents: per
module the first detector that returns a slot wins, and a slot whose tensors a declaration or an
inner slot already holds is skipped.
"""

from __future__ import annotations

from torch import nn

from .candidates import Request, Slot
from .registry import detectors

__all__ = ["declared_groups", "known_float64_fix", "proposed_slots", "example_inputs", "finish"]


def _inside(path: str, roots) -> bool:
    return any(path == p or path.startswith(p + ".") or p == "" for p in roots)


def declared_groups(model: nn.Module, request: Request) -> tuple[list[dict], list[str]]:
    """(groups, paths of the declaring modules): each module's groups named under its path."""
    declaring = [d for d in detectors() if d.declares]
    groups, covered_paths = [], []
    for path, module in model.named_modules():
        if _inside(path, covered_paths):
            continue
        prefix = f"{path}." if path else ""
        for detector in declaring:
            own = detector.find(prefix, module, request)
            if own is not None:
                groups += own
                covered_paths.append(path)
                break
    if request.residual is True and not groups:
        raise ValueError(
            f"residual=True: no module of {type(model).__name__} declares its O(d) (a "
            "symmetry_groups method); declare it with manifolds.ResidualRotation in declared=[...]"
        )
    return groups, covered_paths


def _propose(prefix: str, module: nn.Module, request: Request) -> list[Slot]:
    for detector in detectors():
        if not detector.declares:
            found = detector.find(prefix, module, request)
            if found:
                return found
    return []


def proposed_slots(model, request: Request, skip_paths, declared_ids) -> tuple[list[Slot], list]:
    """(slots in module order, paths whose candidates are all frozen: nothing to optimise)."""
    owners = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = module
    blocked = {id(owners[i]) for i in declared_ids if i in owners}
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    claimed: set[int] = set(declared_ids)
    slots, frozen_paths = [], []
    for path, module in reversed(list(model.named_modules())):  # children before parents
        if _inside(path, skip_paths):
            continue
        taken = set()
        for slot in _propose(f"{path}." if path else "", module, request):
            proposed = bool(slot.options)
            slot.options = [
                o for o in slot.options if all(p.requires_grad for p in o.group["params"])
            ]
            if proposed and not slot.options:
                frozen_paths.append(slot.path.rstrip("."))  # a frozen base: nothing to optimise
                continue
            ids = {id(p) for o in slot.options for p in o.group["params"]}
            ids |= {id(p) for p in slot.params}
            ids |= {id(p) for o in slot.options for _, p in o.frozen}
            if not slot.options and not slot.note:
                continue
            if ids & claimed or id(module) in blocked or {id(owners.get(i)) for i in ids} & blocked:
                continue
            taken |= ids
            slots.append(slot)
        claimed |= taken
    return sorted(slots, key=lambda s: order[id(s.module)]), frozen_paths


def example_inputs(model: nn.Module):
    """``(args, kwargs)`` for one forward of ``model`` from the first detector that can build
    them (Hugging Face configs), or None."""
    for detector in detectors():
        if detector.example_inputs is not None:
            found = detector.example_inputs(model)
            if found is not None:
                return found
    return None


def known_float64_fix(module: nn.Module) -> str:
    """The known fix where ``module``'s float64 copy does not run, from the detectors, or ''."""
    for detector in detectors():
        if detector.float64_fix is not None:
            fix = detector.float64_fix(module)
            if fix:
                return fix
    return ""


def finish(groups: list[dict], request: Request) -> list[dict]:
    """The accepted groups after every detector's ``finish`` hook, in registration order."""
    for detector in detectors():
        if detector.finish is not None:
            groups = detector.finish(groups, request)
    return groups
