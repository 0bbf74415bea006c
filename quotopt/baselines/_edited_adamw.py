"""AdamW with a gradient edit before torch's update and a parameter edit after it."""

from __future__ import annotations

import torch


class EditedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose step is: closure → ``_edit_gradients`` → AdamW update →
    ``_edit_parameters``. Subclasses override the two edits; the update itself is torch's.

    ``_edit_gradients()`` may return anything; it is handed to ``_edit_parameters(token)`` (for
    instance the raw gradients, to put back after the update). A subclass's own per-group
    options are passed to ``__init__`` as keywords, named in ``group_options`` and validated by
    ``_check_group``.
    """

    group_options: tuple[str, ...] = ()

    def __init__(
        self, params, lr, betas, eps, weight_decay, amsgrad, *, maximize, foreach, fused, **options
    ):
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
        self.defaults.update(options)
        for group in self.param_groups:
            for key, value in options.items():
                group.setdefault(key, value)
            self._check_group(group)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if all(key in group for key in self.group_options):  # else __init__ checks it
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
