"""Models that declare their own groups: a module with a ``symmetry_groups`` method.

A model that knows its symmetries says so, as nanoGPT's model owns ``configure_optimizers``:
``module.symmetry_groups(metric, heads=..., residual=..., rescaling=...)`` returns its groups
(``quotopt.groups.declare`` has the helpers that build them). They are taken as declared, on the
outermost module that has the method; nothing inside that module is detected.
"""

from __future__ import annotations

from torch import nn

from ..candidates import Request

__all__ = ["model_groups"]


def model_groups(path: str, module: nn.Module, request: Request) -> list[dict] | None:
    """The groups ``module`` declares, named under ``path``; None if it declares none."""
    declare = getattr(module, "symmetry_groups", None)
    if not callable(declare):
        return None
    own = declare(
        request.metric,
        heads=request.heads,
        residual=request.residual,
        rescaling=request.rescaling,
    )
    return [dict(g, name=path + g["name"]) for g in own]
