"""Validation of the optimisers' configuration: hyperparameters per group and loaded state.

Every rule is checked when a group is added (``add_param_group``, so per-group overrides are
held to the same rules as the defaults) and again at each step (a scheduler may have changed a
value); a loaded ``state_dict`` is checked whole before anything is written. Errors are
``ValueError``s naming the group, the rule and the value.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "check_state_dict",
    "number",
    "positive",
    "unit_interval",
    "boolean",
    "dress_every",
    "decoupled_decay",
    "reject_unsupported",
    "check_freezing",
]


def number(name: str, key: str, value) -> None:
    """A finite number >= 0."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name}: Invalid {key}: {value!r} (expected a finite number >= 0)")
    if value < 0:
        raise ValueError(f"{name}: Invalid {key}: {value} (expected {key} >= 0)")


def unit_interval(name: str, key: str, value) -> None:
    """A number in [0, 1)."""
    number(name, key, value)
    if value >= 1:
        raise ValueError(f"{name}: Invalid {key}: {value} (expected 0 <= {key} < 1)")


def positive(name: str, key: str, value) -> None:
    """A finite number > 0."""
    number(name, key, value)
    if value == 0:
        raise ValueError(f"{name}: Invalid {key}: {value} (expected {key} > 0)")


def boolean(name: str, key: str, value) -> None:
    """True or False (a string such as "no" is truthy and would silently mean True)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: Invalid {key}: {value!r} (expected True or False)")


def dress_every(name: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name}: dress_every must be None or a positive integer, got {value!r}")


def decoupled_decay(name: str, lr: float, weight_decay: float) -> None:
    """Decoupled decay multiplies by 1 − lr·wd: it must stay positive."""
    if lr * weight_decay >= 1:
        raise ValueError(
            f"{name}: Invalid lr·weight_decay: {lr:g}·{weight_decay:g} = {lr * weight_decay:g} "
            "(expected lr·weight_decay < 1: decoupled decay multiplies by 1 − lr·weight_decay)"
        )


def _shapes(value):
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (tuple, list)):
        return tuple(_shapes(v) for v in value)
    return type(value).__name__


def _tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _check_group(optimizer, saved: dict, current: dict) -> None:
    """The saved group was saved by a quotient optimiser (it has a name and a dressing clock)
    and its hyperparameters, with this group's where it lacks one, are valid."""
    name, cls = current["name"], type(optimizer).__name__
    missing = sorted({"name", "dress_clock"} - set(saved))
    if missing:
        raise ValueError(
            f"{name}: state_dict group lacks the keys {missing}, which {cls} keeps; it was "
            "saved by another optimiser (a torch.optim state_dict does not fit a quotopt one)"
        )
    merged = {**current, **{k: v for k, v in saved.items() if k not in ("params", "bundle")}}
    optimizer.validate_group(name, merged)


def check_state_dict(optimizer, state_dict: dict) -> None:
    """Refuse, before anything is written, a state saved by another optimiser class, for other
    groups or bundles, with other or invalid hyperparameters, or holding state entries of other
    keys or shapes than this optimiser's or non-finite values."""
    cls = type(optimizer).__name__
    if not isinstance(state_dict, dict) or not {"state", "param_groups"} <= set(state_dict):
        raise ValueError(f"{cls}: not an optimiser state_dict (needs 'state' and 'param_groups')")
    saved_cls = state_dict.get("optimizer")
    if saved_cls is not None and saved_cls != cls:
        raise ValueError(f"state_dict was saved by {saved_cls}, this optimiser is {cls}")
    saved_groups = state_dict["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise ValueError(
            f"state_dict has {len(saved_groups)} param groups, this optimiser has "
            f"{len(optimizer.param_groups)}"
        )
    expected: dict[int, dict] = {}
    for saved, current in zip(saved_groups, optimizer.param_groups):
        name = current["name"]
        if len(saved["params"]) != len(current["params"]):
            raise ValueError(
                f"{name}: state_dict group has {len(saved['params'])} params, this group has "
                f"{len(current['params'])}"
            )
        _check_group(optimizer, saved, current)
        bundle = repr(current["bundle"]) if current.get("bundle") is not None else None
        if current.get("shards") is not None:  # the unsharded bundle, as state_dict names it
            bundle = current["shards"].description
        if saved.get("bundle") != bundle:
            raise ValueError(
                f"{name}: state_dict was saved for bundle {saved.get('bundle')}, this group has "
                f"{bundle}"
            )
        by_id = optimizer.expected_state(current)
        for saved_id, param in zip(saved["params"], current["params"]):
            if id(param) in by_id:
                expected[saved_id] = (name, by_id[id(param)])
    for key, entry in state_dict["state"].items():
        if key not in expected:
            raise ValueError(f"{cls}: state_dict holds state for param {key}, which has none here")
        name, want = expected[key]
        if set(entry) != set(want):
            raise ValueError(
                f"{name}: state_dict entry has keys {sorted(entry)}, {cls} keeps {sorted(want)}"
            )
        for k, value in entry.items():
            if _shapes(value) != _shapes(want[k]):
                raise ValueError(
                    f"{name}: state '{k}' has shape {_shapes(value)}, expected {_shapes(want[k])}"
                )
            if not all(bool(t.isfinite().all()) for t in _tensors(value) if t.is_floating_point()):
                raise ValueError(
                    f"{name}: state '{k}' holds non-finite values (NaN or inf), which would make "
                    "every later step fail; load a state saved before the values went non-finite"
                )


def reject_unsupported(cls_name: str, options: dict) -> None:
    """torch.optim options the quotient optimisers do not implement are refused, not ignored."""
    for name, value in options.items():
        if value not in (None, False):
            raise ValueError(
                f"{cls_name} does not implement {name}={value!r}; its steps are already batched "
                "over heads (leave the option unset)"
            )


def check_freezing(name: str, params: list, when: str) -> None:
    """A bundle group is frozen whole or not at all."""
    frozen = [i for i, p in enumerate(params) if not p.requires_grad]
    if frozen and len(frozen) < len(params):
        shapes = ", ".join(f"params[{i}] {tuple(params[i].shape)}" for i in frozen)
        raise ValueError(
            f"{name}: {shapes} requires_grad=False {when} but the group's other params do "
            "not; a quotient step moves every tensor of a bundle together, so nothing was "
            "changed. Freeze the whole group (requires_grad_(False) on each of its params) or "
            "none of it, or build the optimiser again from groups that leave the frozen "
            "tensors out"
        )
