"""The hooks a quotient optimiser defines (``UpdateRule``); ``QuotientOptimizer`` does the rest.

The shell (``quotopt.optim.base``) validates groups, builds views through layouts, creates
state lazily, stacks bundle groups of one shape, caches factorisations, guards the commit and
checkpoints. What it asks of an optimiser is its rule: hyperparameter checks, the initial
state, the keyword arguments of its pure updates, and the two pure updates themselves — one
for bundle groups (on the quotient) and one for plain groups (torch's rule). Walkthrough:
docs/contributing.md, "Adding an optimiser".
"""

from __future__ import annotations

import abc

from manifolds.frame import Frame

from .moments import step_counter

__all__ = ["UpdateRule"]


class UpdateRule(abc.ABC):
    """What a ``QuotientOptimizer`` subclass implements (abstract methods) and may override
    (the attributes with defaults).

    Groups reach the hooks as torch.optim groups: dicts with ``"params"``, ``"name"``, the
    optimiser's ``defaults`` (which must hold ``dress_every``, and ``maximize`` where the rule
    supports it) and, for bundle groups, ``"bundle"`` (and ``"layout"``). State is a dict of
    tensors, or of tuples of tensors for bundle groups; it stays torch.optim's, so
    ``state_dict`` and ``torch.load(weights_only=True)`` work unchanged. A ``TypedDict`` in
    each optimiser's module documents its keys and shapes.
    """

    # ---- required ---------------------------------------------------------------------------
    @abc.abstractmethod
    def _check_hyperparameters(self, name: str, group: dict) -> None:
        """Raise ``ValueError`` naming the group ``name``, the rule and the value for every
        invalid hyperparameter of ``group`` (``quotopt.optim.validation`` has the common
        rules). Called when the group is added and before every step (a scheduler may change
        a group's keys); it must not change the group."""

    @abc.abstractmethod
    def _init_state(self, group: dict, point: tuple) -> dict:
        """The state of ``group`` before its first step. ``point`` is the bundle's point (a
        tuple of views) for a bundle group, ``(param,)`` for each tensor of a plain group.
        Tensors only (step counters as ``quotopt.optim.moments.step_counter``); a bundle
        group's moments are tuples shaped like ``point``."""

    @abc.abstractmethod
    def _hyperparameters(self, group: dict) -> dict:
        """The keyword arguments of this step's pure update of ``group`` (read every step)."""

    @staticmethod
    @abc.abstractmethod
    def _bundle_update(frame: Frame, grad: tuple, state: dict, *, dress: bool, **hyper):
        """One step on a bundle group, out of place: returns ``(new_point, new_state,
        new_frame)``, the last ``frame.moved(new_point)``. ``frame`` is ``bundle.at(point)``,
        the only way to the geometry; ``grad`` the Euclidean gradient (a tuple like the point);
        ``dress``: re-dress first (``quotopt.optim.redress.begin_step``). It writes none of its
        inputs and synchronises nothing with the host; ``new_state`` has ``state``'s keys and
        shapes. When the metric is G-invariant (or ``dress`` holds at the first step) it must
        commute with the group action: runs from p and p·g stay on one orbit."""

    @staticmethod
    @abc.abstractmethod
    def _plain_update(params: list, grads: list, states: list, **hyper):
        """One step on the tensors of a plain group, out of place: returns ``(new_params,
        new_states)``, lists aligned with the inputs (states as ``_init_state``'s)."""

    # ---- optional ---------------------------------------------------------------------------
    #: state entries whose finiteness the guard checks besides the parameters (an infinite
    #: second moment would silently zero a step instead of spreading)
    _checked_state: tuple[str, ...] = ()

    #: a plain update that returns ``(new_params, checks, commit(ok))`` and updates the state
    #: in place at commit (``quotopt.optim.adam.adam_plain_in_place``) — or None, for a group
    #: it does not serve, which ``_plain_update`` then steps —, or None
    _plain_in_place = None

    @staticmethod
    def _stackable(hyper: dict) -> bool:
        """Whether a group with these hyperparameters may be stepped with others of its shape
        (``quotopt.optim.stacking``): only if its update treats every head alone."""
        return True

    @staticmethod
    def _gathers_matrices(group: dict) -> bool:
        """Whether the plain update of ``group`` needs whole matrices (``torch.optim.Muon``'s
        rule); on shards it is then given ``gather`` (``quotopt.optim.sharding.Gathered``)."""
        return False

    #: a step counter at zero on a tensor's device, for ``_init_state``
    _zero_step = staticmethod(step_counter)
