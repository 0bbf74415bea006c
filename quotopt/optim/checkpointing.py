"""``state_dict`` and ``load_state_dict`` of the quotient optimisers: bundles are structure,
not state; sharded state is presented as DTensors (``quotopt.optim.sharding``)."""

from __future__ import annotations

from manifolds import unchecked

from . import sharding
from .sharding import Shards
from .validation import check_state_dict

__all__ = ["Checkpointing"]

#: what the optimiser's construction decides, not its state: kept through ``load_state_dict``
_STRUCTURAL_KEYS = ("bundle", "layout", "frozen", "shards")


class Checkpointing:
    """The state_dict half of ``QuotientOptimizer`` (a mixin before ``torch.optim.Optimizer``)."""

    # ---- state_dict: bundles are structure, not state -----------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        sharding.globalise(self, state["state"])
        for group in state["param_groups"]:
            shards = group.pop("shards", None)
            if group.get("bundle") is not None:
                group["bundle"] = shards.description if shards else repr(group["bundle"])
            group.pop("layout", None)
        state["optimizer"] = type(self).__name__
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by ``state_dict``; every mismatch (optimiser class, groups, bundles,
        state keys, tensor shapes), an invalid hyperparameter or a non-finite state value is
        refused with a ValueError before anything is written. Structure (``bundle``,
        ``layout``, ``frozen``) stays this optimiser's; a hyperparameter the saved group lacks
        keeps this group's value."""
        if isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict):
            # DTensors to this rank's shards, lists (as torch.distributed.checkpoint keeps a
            # bundle's tensors) to tuples
            states = state_dict["state"].items()
            local_states = {
                k: Shards.local_state(v) if isinstance(v, dict) else v for k, v in states
            }
            state_dict = dict(state_dict, state=local_states)
        state_dict = self._with_frame_bases(state_dict)
        check_state_dict(self, state_dict)
        structure = [{k: g[k] for k in _STRUCTURAL_KEYS if k in g} for g in self.param_groups]
        hyper = [{k: g[k] for k in self.defaults} for g in self.param_groups]
        state_dict = {k: v for k, v in state_dict.items() if k != "optimizer"}
        super().load_state_dict(state_dict)
        for group, keys, values in zip(self.param_groups, structure, hyper):
            for key in _STRUCTURAL_KEYS:
                group.pop(key, None)
            group.update(keys)
            for key, value in values.items():
                group.setdefault(key, value)
        self._frames.clear()
        self._deficient.clear()

    def _with_frame_bases(self, state_dict: dict) -> dict:
        """A state saved before frame bases were kept (``QuotientOptimizer._initial_state``)
        converted: each bundle group's entry lacking ``"frame_basis"`` gets the empty bases
        (its next frame is factorised afresh, as a run that saved none would)."""
        states, groups = state_dict.get("state"), state_dict.get("param_groups")
        if not isinstance(states, dict) or not isinstance(groups, list):
            return state_dict
        states = dict(states)
        for saved, current in zip(groups, self.param_groups):
            if current.get("bundle") is None or not isinstance(saved, dict):
                continue
            expected = self.expected_state(current).get(id(current["params"][0]), {})
            key = (saved.get("params") or [None])[0]
            entry = states.get(key)
            if "frame_basis" in expected and isinstance(entry, dict):
                if "frame_basis" not in entry:
                    states[key] = dict(entry, frame_basis=expected["frame_basis"])
        return dict(state_dict, state=states)

    def expected_state(self, group: dict) -> dict:
        """The state a fresh step would create for ``group`` (shapes and dtypes to check a
        loaded state against), keyed like ``self.state`` entries."""
        params = list(group["params"])
        if group.get("bundle") is not None:
            with unchecked():
                return {id(params[0]): self._initial_state(group, self._views(group, params))}
        return {id(p): self._init_state(group, (sharding.local(p),)) for p in params}
