"""AdamW with a gradient edit before torch's update and a parameter edit after it."""

from __future__ import annotations

import torch


class EditedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose step is: closure → ``_edit_gradients`` → AdamW update →
    ``_edit_parameters``. Subclasses override the two edits; the update itself is torch's.

    ``_edit_gradients()`` may return anything; it is handed to ``_edit_parameters(token)`` (for
    instance the raw gradients, to put back after the update). The arguments are those of
    ``torch.optim.AdamW`` (``params``, ``lr``, ``betas``, ``eps``, ``weight_decay``,
    ``amsgrad``, ``maximize``, ``foreach``, ``fused``), plus a subclass's own per-group options
    as keywords: ``group_defaults`` names them with their defaults, ``_check_group`` validates
    them; any other keyword is a ``TypeError``.
    """

    group_defaults: dict[str, object] = {}

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        amsgrad: bool = False,
        maximize: bool = False,
        foreach: bool | None = None,
        fused: bool | None = None,
        **options,
    ):
        unknown = sorted(set(options) - set(self.group_defaults))
        if unknown:
            raise TypeError(
                f"{type(self).__name__} has no option {', '.join(unknown)}; its own options "
                f"are {', '.join(self.group_defaults) or 'none'} (the rest are AdamW's)"
            )
        super().__init__(
            params,
            lr,
            betas,
            eps,
            weight_decay,
            amsgrad,
            maximize=maximize,
            foreach=foreach,
            fused=fused,
        )
        # AdamW adds the groups before the subclass's defaults exist: fill them in now.
        options = {**self.group_defaults, **options}
        self.defaults.update(options)
        for group in self.param_groups:
            for key, value in options.items():
                group.setdefault(key, value)
            self._check_group(group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if all(key in group for key in self.group_defaults):  # else __init__ checks it
            self._check_group(group)

    def _check_group(self, group: dict) -> None:
        del group

    def _edit_gradients(self):
        return None

    def _edit_parameters(self, token) -> None:
        del token

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        token = self._edit_gradients()
        _adamw_update(self)
        self._edit_parameters(token)
        return loss


def _adamw_update(optimizer: torch.optim.AdamW) -> None:
    update = torch.optim.AdamW.step
    # torch wraps each optimiser class's step() in a runner of the step hooks; ours already ran
    # this optimiser's hooks, so call the parent's unwrapped step or they would run twice.
    if getattr(update, "hooked", False):
        update = update.__wrapped__
    update(optimizer)
