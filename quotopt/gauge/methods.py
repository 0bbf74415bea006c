r"""The representatives compared: baselines from their papers' rules, and quotopt's gauges.

Each method is a ``Plan`` (``quotopt.gauge.search``) on the same fibre, fake-quantised the same
way; only the part of the fibre it may use and how it starts differ. The online transforms of
QuaRot, SpinQuant and FlatQuant (Hadamards applied to activations at run time, FlatQuant's
per-linear Kronecker transforms) change the architecture and are left out everywhere.

=============  ===========================================================================
``rtn``        no transformation (round-to-nearest as the weights come)
``quarot``     QuaRot's random Hadamard rotation of the residual stream, fixed
``spinquant``  SpinQuant: residual R1 and per-block R2 on V/O shared by the heads, both
               orthogonal, started at random Hadamards, learned
``flatquant``  FlatQuant's offline part: one invertible r×r matrix per block on V/O shared by
               the heads, learned from the identity; the residual carries QuaRot's rotation
               (FlatQuant's own residual-side transforms are online)
``residual``   quotopt, O(d) alone: R learned from a random Hadamard
``heads``      quotopt, the heads alone: GL(r) per key/value head on (W_v, W_o) and the RoPE
               commutant on (W_q, W_k), learned from the identity; residual as QuaRot
``units``      quotopt, GL(1) per gated-MLP unit alone (the only part of the fibre that reaches
               the down projection's input); residual as QuaRot
``joint``      quotopt, the whole fibre: R, the heads' groups and GL(1) per gated-MLP unit
=============  ===========================================================================

SpinQuant trains with Cayley SGD; here every learned method uses the same optimiser
(``GaugeSearch``: Adam in the Lie algebra, Cayley retraction on the orthogonal factors), the same
objective, steps and data, so that the comparison isolates the part of the fibre.
"""

from __future__ import annotations

from .search import Factor, Plan

__all__ = ["METHODS", "LEARNED", "plan_of"]

_HADAMARD = Factor("residual", "orthogonal", init="hadamard", learn=False)
_R1 = Factor("residual", "orthogonal", init="hadamard")
_HEADS = (Factor("ov", "general"), Factor("qk", "rotary"))

METHODS: dict[str, Plan] = {
    "rtn": (),
    "quarot": (_HADAMARD,),
    "spinquant": (_R1, Factor("ov", "orthogonal", init="hadamard", shared=True)),
    "flatquant": (_HADAMARD, Factor("ov", "general", shared=True)),
    "residual": (_R1,),
    "heads": (_HADAMARD, *_HEADS),
    "units": (_HADAMARD, Factor("units", "general")),
    "joint": (_R1, *_HEADS, Factor("units", "general")),
}
#: the methods whose plan learns something
LEARNED = tuple(name for name, plan in METHODS.items() if any(f.learn for f in plan))


def plan_of(name: str) -> Plan:
    """The plan of method ``name``; ``ValueError`` naming the methods otherwise."""
    if name not in METHODS:
        raise ValueError(f"method {name!r} is unknown; choose from {', '.join(METHODS)}")
    return METHODS[name]
