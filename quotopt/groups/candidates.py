r"""The types every detector shares: what a detection is asked (``Request``), where a symmetry
may be (``Slot``) and the candidate groups proposed there (``Option``).

A detector returns ``Slot``\ s: one per (module, part) — a head's query/key pair, its
value/output pair, an MLP's units — each with ``Option``\ s in order of preference (the most
general group first: full GL(r) before the RoPE commutant). ``quotopt.symmetries`` keeps, per
slot, the first option that verifies (``quotopt.groups.checks.check_in_module``), so a structure
that matches by shape but not by function is rejected and reported, never returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

__all__ = ["Option", "Request", "Slot"]


@dataclass(frozen=True)
class Request:
    """What ``symmetries`` asks every detector for: the bundles' ``metric``, whether to propose
    GL(r) per attention ``heads``, ``rescaling`` of MLP units, the residual O(d) (``residual``:
    ``"auto"``, True or False; for models that declare it), and the damping of the invariant
    metric on LoRA adapter pairs (``lora_damping``)."""

    metric: str = "euclidean"
    heads: bool = True
    rescaling: bool = True
    residual: bool | str = "auto"
    lora_damping: float = 0.0


@dataclass
class Option:
    """A candidate group (``params``, ``bundle``, ``layout``, ``name``), what it assumes, and the
    key-bias parameters to freeze if it is accepted."""

    group: dict
    structure: str
    frozen: tuple = ()


@dataclass
class Slot:
    """Where a symmetry may be: ``module`` (the smallest module holding every option's
    parameters, run to verify), its ``path``, ``kind`` (attention, mlp, experts, lora), ``part``
    (qk, ov, units, adapters), ``options``; ``probe(generator) -> (args, kwargs)`` calls the
    module on its own (else a call recorded from the model is used, else ``fallback``); ``note``
    explains a slot without options or whose options all fail; ``compose`` names the group that
    accepted slots of one module sharing tensors become; ``params`` are the tensors a slot
    without options concerns (no enclosing module proposes them again)."""

    module: nn.Module
    path: str
    kind: str
    part: str
    options: list[Option] = field(default_factory=list)
    probe: Callable | None = None
    fallback: Callable | None = None
    note: str = ""
    family: str = ""
    compose: str = ""
    params: tuple = ()
