"""Verification of detected slots: each slot's first option that leaves the output unchanged.

A slot's module is called as it is in one forward of the model (its recorded call), or on its
own (``Slot.probe``, ``Slot.fallback``); each option is checked on a float64 copy of that module
with every parameter randomised (``quotopt.groups.checks.check_in_module``), and the report
records what was accepted, what was tried before it and why a slot has no group.
"""

from __future__ import annotations

import torch

from .checks import Float64Error, check_in_module
from .walk import known_float64_fix

__all__ = ["check_slots"]


def _record_calls(model, modules, inputs) -> dict[int, tuple]:
    """The first (args, kwargs) each module is called with in one forward of ``model``."""
    calls: dict[int, tuple] = {}

    def hook(module, args, kwargs):
        calls.setdefault(id(module), (args, dict(kwargs)))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    modes = [(m, m.training) for m in model.modules()]
    args, kwargs = inputs
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for m, training in modes:  # every module's own mode, not one flag for all
            m.training = training
        for h in handles:
            h.remove()
    return calls


def check_slots(model, slots, report, example, tolerance, generator):
    """Verify each slot's options in order; returns (accepted groups, frozen key biases, paths of
    slots left unverified for want of a working example forward, and why)."""
    needs = [s.module for s in slots if s.probe is None and s.options]
    calls, failure = {}, ""
    if needs and example is not None:
        try:
            calls = _record_calls(model, needs, example)
        except Exception as error:  # noqa: BLE001 - reported: the user's inputs did not fit
            failure = f"the example forward failed ({type(error).__name__}: {error})"
    if example is None:
        failure = "no example inputs could be built for the model"
    accepted, frozen, unverified = [], [], []
    for slot in slots:
        call = slot.probe(generator) if slot.probe is not None else calls.get(id(slot.module))
        if call is None and slot.fallback is not None:
            call = slot.fallback(generator)
        if not slot.options:
            report.add(slot.path, slot.part, "detected", structure=slot.family, note=slot.note)
            continue
        if call is None:
            why = "not called by the example inputs" if not failure else failure
            if example is None:
                why = "not verified: pass example_inputs=(args, kwargs)"
            unverified += [slot.path.rstrip(".")] if failure else []
            report.add(slot.path, slot.part, "detected", structure=slot.family, note=why)
            continue
        option = _first_verified(slot, call, report, tolerance, generator)
        if option is not None:
            option.group["compose"] = slot.compose
            accepted.append(option.group)
            frozen += [(label, p, slot) for label, p in option.frozen]
    return accepted, frozen, (unverified, failure)


def _first_verified(slot, call, report, tolerance, generator):
    """The first of ``slot``'s options whose check passes (reported with the ones tried before
    it), or None (reported with every option tried, or with the module's float64 failure)."""
    tried = []
    for option in slot.options:
        try:
            change, _ = check_in_module(slot.module, option.group, call, generator)
        except Float64Error as error:
            fix = known_float64_fix(slot.module) or (
                "declare the groups and check them with quotopt.verify in the model's dtype"
            )
            note = f"not verified: {error}; {fix}"
            report.add(slot.path, slot.part, "detected", structure=slot.family, note=note)
            return None
        except (ValueError, RuntimeError, TypeError) as error:
            tried.append(f"{option.structure}: {error}")
            continue
        if change <= tolerance:
            report.add(
                slot.path,
                slot.part,
                "detected",
                option.group,
                change=change,
                structure=f"{slot.family}; {option.structure}",
                tried=tuple(tried),
            )
            return option
        tried.append(f"{option.structure}: change {change:.0e}")
    note = slot.note or "no candidate verified"
    tried_all = f"{note} (tried {'; '.join(tried)})"
    report.add(slot.path, slot.part, "detected", structure=slot.family, note=tried_all)
    return None
