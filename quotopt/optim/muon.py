"""QuotientMuon: Muon's orthogonalised step on the quotient of every factored bundle group,
``torch.optim.Muon`` on plain groups of matrices and ``torch.optim.AdamW`` on the other plain
groups (each plain group's ``"rule"``), so that one optimiser serves a whole model."""

from __future__ import annotations

import torch

from manifolds import Bundle

from . import validation as rules
from .base import QuotientOptimizer
from .orthogonal import (
    NS_COEFFICIENTS,
    NS_EPS,
    NS_STEPS,
    SCOPES,
    factored_parts,
    muon_bundle_update,
    muon_plain_updates,
)
from .plain import torch_adamw_updates

__all__ = ["QuotientMuon", "RULES"]

_ADJUST = (None, "original", "match_rms_adamw")
#: how a plain group is stepped (its ``"rule"``): torch.optim.Muon or torch.optim.AdamW
RULES = ("muon", "adamw")
#: keys of an adamw group that would be Muon's (and ignored) there, with the key meant
_ADAMW_SPELLING = {"weight_decay": "adamw_weight_decay", "eps": "adamw_eps", "betas": "adamw_betas"}
#: the AdamW rule's defaults: those of the Adam groups (``use_muon=False``) of ``MuonWithAuxAdam``
#: in Keller Jordan's Muon repository
ADAMW_LR = 3e-4
ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-10
ADAMW_WEIGHT_DECAY = 0.0


def _plain_updates(params, grads, states, *, rule: str, **hyper):
    """A plain group's update by its rule: ``torch.optim.AdamW``'s or ``torch.optim.Muon``'s."""
    update = torch_adamw_updates if rule == "adamw" else muon_plain_updates
    return update(params, grads, states, **hyper)


class QuotientMuon(QuotientOptimizer):
    r"""Muon on quotient manifolds (a ``torch.optim.Optimizer``).

    Groups without a ``"bundle"`` (plain groups) are stepped by their ``"rule"``:

    * ``"muon"`` — exactly ``torch.optim.Muon`` (same hyperparameters, defaults and bits; one
      deliberate exception: for bfloat16 parameters with ``nesterov=False`` torch's Newton–Schulz
      divides its own momentum buffer in place, since ``buf.bfloat16()`` is ``buf``, and
      QuotientMuon leaves the buffer alone); 2-D parameters only;
    * ``"adamw"`` — ``torch.optim.AdamW`` with the group's ``"lr"`` and its ``"adamw_betas"``,
      ``"adamw_eps"`` and ``"adamw_weight_decay"`` (state ``step``, ``exp_avg``,
      ``exp_avg_sq`` as there); any shape. Bit for bit on the CPU (``torch_adamw_updates``
      in ``quotopt.optim.plain``); on accelerators, where torch's default is its multi-tensor
      implementation, the update is ``QuotientAdam``'s plain one, equal to torch's to rounding.

    The default rule is ``"muon"`` for a plain group whose params are all 2-D and ``"adamw"``
    for one holding any other tensor (norm gains, biases). Embeddings and the read-out are 2-D
    but, as Muon's authors advise, belong on AdamW: mark their group ``"rule": "adamw"``. This
    is the arrangement of Keller Jordan's ``MuonWithAuxAdam`` (groups with ``use_muon=False``
    run Adam with their own lr, betas, eps and weight decay), so one optimiser serves a whole
    model: the factored symmetry groups of ``quotopt.symmetries`` on the quotient, the other
    hidden matrices by Muon, the rest by AdamW. An adamw group's learning rate is its ``"lr"``
    — the key LR schedulers scale, so one schedule drives both rules — and defaults to
    ``adamw_lr``, not ``lr``; a group may spell it ``"adamw_lr"`` when built. A group's rule
    is fixed once it has state: a state_dict saved under one rule does not load into a group
    of the other. Bundle groups are Muon's only (each head's factors are orthogonalised); they
    must be factored bundles — two factors per head, (A g, B g⁻ᵀ) with g in a subgroup of GL(r):
    ``HeadQK``, ``HeadOV``, ``RotaryQK``, ``PositiveRescaling`` (``bundle.factors``) — or
    products of them (``ProductBundle``: fused q/k/v, partial rotary, ``nn.MultiheadAttention``),
    whose components are dressed and orthogonalised one by one.

    **Algorithm** (a bundle group at p, Euclidean gradient ∇f, momentum m; the pure update is
    ``quotopt.optim.orthogonal.muon_bundle_update``)::

        every dress_every steps:  p̄ = p·u(p),  m ← m·u(p),  ∇f ← act_dual(∇f, u(p))
        ξ = grad_metric f(p̄);   m ← μ m + (1 − μ) ξ;   X = (1 − μ) ξ + μ m if nesterov else m
        D = P_H(NS(X_A) · s_A, NS(X_B) · s_B)     # per head (scope="head") or per tensor
        p' = retract(scale_invariants(p̄, 1 − lr·wd), −limit_step(lr·D));  m ← P_H at p'

    NS is torch's Newton–Schulz in the parameters' precision (float32 at least), s the ratio of
    torch's ``adjust_lr_fn`` for a (k, rows) weight (k = r per head, H·r per tensor). Weight
    decay acts on the invariants (M ↦ (1 − lr·wd)M). Why this is a step on P/G, why
    orthogonalising at the balanced representative makes Muon's spectral-norm steepest descent a
    norm on the quotient, when runs from p and p·g coincide, and why Newton–Schulz rather than
    an exact polar factor: docs/theory/optimisers.md#quotientmuon.

    Args:
        params: tensors or param groups (``"bundle"``, ``"layout"``, ``"name"`` as in
            ``QuotientAdam``).
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn:
            as in ``torch.optim.Muon`` (and its defaults).
        scope: ``"head"`` (default) or ``"tensor"``: what one orthogonalised matrix of a bundle
            group is (the D line of the algorithm).
        maximize: ascend instead.
        dress_every: re-dress bundle groups every ``dress_every`` steps from the first
            (default 1); ``None`` never dresses.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW rule's ``lr``,
            ``betas``, ``eps`` and decoupled ``weight_decay`` (group keys of those names
            override them; an adamw group's ``"lr"`` is its AdamW learning rate, defaulting to
            ``adamw_lr``). Defaults 3e-4, (0.9, 0.95), 1e-10 and 0: the defaults of the Adam
            groups (``use_muon=False``) of ``MuonWithAuxAdam`` in Keller Jordan's Muon
            repository, the reference implementation by Muon's authors, so that an adamw group
            is stepped as they step the parameters beside Muon (their modded-nanogpt example
            keeps ε = 1e-10 and β₂ = 0.95, with β₁ = 0.8) — not torch's AdamW defaults
            (1e-3, (0.9, 0.999), 1e-8, 0.01); with no decay by default, gains, biases and
            embeddings are decayed only when asked. The arithmetic is torch's AdamW (its bias
            corrections, ε added to √v̂), not that repository's own Adam: an adamw group
            matches ``torch.optim.AdamW`` with the same hyperparameters.
        nonfinite: ``"raise"`` or ``"skip"`` (see ``QuotientAdam``).

    Raises ValueError (nothing built or changed) for a bundle group with rule ``"adamw"``, a
    group with rule ``"muon"`` holding a tensor that is not 2-D, an ``adamw_*`` key on a muon
    group or a Muon key standing for an AdamW one (``weight_decay``, ``eps``, ``betas``) on an
    adamw group, and an invalid hyperparameter of either rule.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
        eps: float = NS_EPS,
        ns_steps: int = NS_STEPS,
        adjust_lr_fn: str | None = None,
        *,
        scope: str = "head",
        maximize: bool = False,
        dress_every: int | None = 1,
        adamw_lr: float = ADAMW_LR,
        adamw_betas: tuple[float, float] = ADAMW_BETAS,
        adamw_eps: float = ADAMW_EPS,
        adamw_weight_decay: float = ADAMW_WEIGHT_DECAY,
        nonfinite: str = "raise",
    ):
        rules.number("QuotientMuon", "adamw_lr", adamw_lr)
        self._adamw_lr = adamw_lr  # the default "lr" of adamw groups (not a key of every group)
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            nesterov=nesterov,
            ns_coefficients=tuple(ns_coefficients),
            eps=eps,
            ns_steps=ns_steps,
            adjust_lr_fn=adjust_lr_fn,
            scope=scope,
            maximize=maximize,
            dress_every=dress_every,
            adamw_betas=tuple(adamw_betas),
            adamw_eps=adamw_eps,
            adamw_weight_decay=adamw_weight_decay,
        )
        super().__init__(params, defaults, nonfinite=nonfinite)

    def add_param_group(self, param_group: dict) -> None:
        param_group = dict(param_group)
        params = param_group["params"]
        if not isinstance(params, set):  # torch refuses sets itself
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            param_group["params"] = params
        name = param_group.get("name", f"param group {len(self.param_groups)}")
        bundle = param_group.get("bundle")
        tensors = [p for p in params if isinstance(p, torch.Tensor)]
        if "rule" not in param_group:
            matrices = bundle is not None or all(p.dim() == 2 for p in tensors)
            param_group["rule"] = "muon" if matrices else "adamw"
        rule = param_group["rule"]
        if bundle is not None or rule not in RULES:
            self._check_rule(name, param_group)  # a bundle group's rule is Muon's
        if param_group.get("frozen", False) is not True:  # a frozen group is never stepped
            self._check_keys(name, param_group)
        if rule == "adamw":
            param_group.setdefault("lr", param_group.pop("adamw_lr", self._adamw_lr))
        if bundle is None and param_group.get("frozen", False) is not True:  # frozen: any shape
            for i, p in enumerate(tensors):
                if p.is_complex():
                    raise ValueError(
                        f"{name}: params[{i}] is complex; QuotientMuon takes real tensors"
                    )
        elif isinstance(bundle, Bundle) and rule == "muon":
            try:
                shapes = [torch.empty(p.shape, device="meta") for p in params]  # DTensors too
                factored_parts(bundle, self._views(param_group, shapes))
            except NotImplementedError as error:
                raise ValueError(
                    f"{name}: QuotientMuon orthogonalises the two factors of each head, but "
                    f"{bundle!r} has none in some part ({error}); use QuotientAdam for this group"
                ) from None
        super().add_param_group(param_group)

    @staticmethod
    def _check_keys(name: str, group: dict) -> None:
        """Keys of the other rule, which the group would silently ignore, are refused."""
        if group["rule"] == "muon":
            foreign = sorted(k for k in group if k.startswith("adamw_"))
            if foreign:
                raise ValueError(
                    f"{name}: {foreign} set the AdamW rule's hyperparameters, but this group's "
                    "rule is 'muon'; add {'rule': 'adamw'} to the group (embeddings, the "
                    "read-out) or drop the keys"
                )
            return
        if "adamw_lr" in group and "lr" in group:
            raise ValueError(
                f"{name}: both 'lr' and 'adamw_lr' are set; an adamw group's 'lr' is its AdamW "
                "learning rate: set one of them"
            )
        for key, meant in _ADAMW_SPELLING.items():
            if key in group:
                raise ValueError(
                    f"{name}: '{key}' is a Muon hyperparameter, unused by this group's rule "
                    f"'adamw'; set '{meant}' instead"
                )

    def _init_state(self, group: dict, point: tuple) -> dict:
        if group.get("bundle") is None and group.get("rule") == "adamw":  # QuotientAdam's
            (param,) = point
            zeros = torch.zeros_like(param, memory_format=torch.preserve_format)
            return {"step": self._zero_step(param), "exp_avg": zeros, "exp_avg_sq": zeros.clone()}
        buffers = tuple(torch.zeros_like(t, memory_format=torch.preserve_format) for t in point)
        return {"momentum_buffer": buffers if group.get("bundle") is not None else buffers[0]}

    @staticmethod
    def _stackable(hyper: dict) -> bool:
        """Only per-head scope stacks: ``"tensor"`` orthogonalises a group's factor whole."""
        return hyper["scope"] == "head"

    _plain_update = staticmethod(_plain_updates)
    _gathers_matrices = staticmethod(lambda group: group["rule"] == "muon")  # Newton–Schulz
    _bundle_update = staticmethod(muon_bundle_update)
    #: an infinite buffer would normalise to zero steps, an infinite v zero AdamW's step
    _checked_state = ("momentum_buffer", "exp_avg_sq")

    def _check_hyperparameters(self, name: str, group: dict) -> None:
        rules.number(name, "learning rate", group["lr"])
        rules.unit_interval(name, "momentum value", group["momentum"])
        rules.number(name, "weight_decay value", group["weight_decay"])
        rules.positive(name, "epsilon value", group["eps"])  # Newton–Schulz divides by it
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise ValueError(
                f"{name}: Invalid ns_coefficients: {coefficients!r} (expected three numbers)"
            )
        steps = group["ns_steps"]
        if not isinstance(steps, int) or isinstance(steps, bool) or not 0 <= steps < 100:
            raise ValueError(f"{name}: Invalid ns_steps: {steps!r} (expected 0 <= ns_steps < 100)")
        if group["adjust_lr_fn"] not in _ADJUST:
            raise ValueError(
                f"{name}: Invalid adjust_lr_fn: {group['adjust_lr_fn']!r} (expected one of "
                f"{_ADJUST})"
            )
        if group["scope"] not in SCOPES:
            raise ValueError(
                f"{name}: Invalid scope: {group['scope']!r} (expected one of {SCOPES})"
            )
        if group.get("bundle") is not None:  # decoupled decay on the invariants
            rules.decoupled_decay(name, group["lr"], group["weight_decay"])
        rules.dress_every(name, group["dress_every"])
        betas = group["adamw_betas"]
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{name}: Invalid adamw_betas: {betas!r} (expected a pair)")
        for index, beta in enumerate(betas):
            rules.unit_interval(name, f"adamw_betas[{index}]", beta)
        rules.number(name, "adamw_eps", group["adamw_eps"])
        rules.number(name, "adamw_weight_decay", group["adamw_weight_decay"])
        self._check_rule(name, group)

    def _check_rule(self, name: str, group: dict) -> None:
        """The group's rule fits its tensors and its state (a scheduler, or a hand, may change a
        group's keys between steps)."""
        rule = group.get("rule", "muon")
        if rule not in RULES:
            raise ValueError(f"{name}: Invalid rule: {rule!r} (expected one of {RULES})")
        if group.get("bundle") is not None:
            if rule != "muon":
                raise ValueError(
                    f"{name}: Invalid rule: {rule!r} for a bundle group; QuotientMuon "
                    "orthogonalises each head's factors of a bundle group (rule 'muon'); use "
                    "QuotientAdam for Adam on the quotient, or leave the bundle out to step "
                    "these tensors by AdamW as plain ones"
                )
            return
        params = group["params"]
        if rule == "adamw":
            rules.decoupled_decay(name, group["lr"], group["adamw_weight_decay"])
        elif group.get("frozen", False) is not True:
            for i, p in enumerate(params):
                if isinstance(p, torch.Tensor) and p.dim() != 2:
                    raise ValueError(
                        f"{name}: rule 'muon' (like torch.optim.Muon) updates 2-D parameters "
                        f"only, but params[{i}] has shape {tuple(p.shape)}; put embeddings, "
                        "norms, biases and other non-matrix parameters in a group of their "
                        "own, which QuotientMuon steps by AdamW (rule 'adamw', the default for "
                        "a group holding any tensor that is not 2-D)"
                    )
        state = getattr(self, "state", {})
        for i, p in enumerate(params):
            held = state.get(p) if isinstance(p, torch.Tensor) else None
            if held and ("exp_avg" in held) != (rule == "adamw"):
                raise ValueError(
                    f"{name}: rule is {rule!r} but params[{i}] holds the state of the other "
                    f"rule ({sorted(held)}); a group's rule is fixed once it has state"
                )

    def _hyperparameters(self, group: dict) -> dict:
        if group.get("bundle") is None and group["rule"] == "adamw":
            beta1, beta2 = group["adamw_betas"]
            return dict(
                rule="adamw",
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["adamw_eps"],
                weight_decay=group["adamw_weight_decay"],
                maximize=group["maximize"],
            )
        names = (
            "lr",
            "weight_decay",
            "momentum",
            "nesterov",
            "ns_coefficients",
            "eps",
            "ns_steps",
            "adjust_lr_fn",
            "scope",
            "maximize",
        )
        hyper = {k: group[k] for k in names}
        return hyper if group.get("bundle") is not None else dict(hyper, rule="muon")

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``QuotientOptimizer.load_state_dict``; also refused (before anything is written):
        a group saved under another rule. A group's rule stays this optimiser's (a state_dict
        saved before plain groups had rules holds Muon groups)."""
        saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(saved_groups, list) and len(saved_groups) == len(self.param_groups):
            for saved, group in zip(saved_groups, self.param_groups):
                saved_rule = saved.get("rule", "muon") if isinstance(saved, dict) else None
                if saved_rule is not None and saved_rule != group["rule"]:
                    raise ValueError(
                        f"{group['name']}: state_dict was saved for rule {saved_rule!r}, this "
                        f"group has rule {group['rule']!r}"
                    )
        rules_now = [group["rule"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, rule in zip(self.param_groups, rules_now):
            group["rule"] = rule
