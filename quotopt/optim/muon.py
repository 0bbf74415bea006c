r"""QuotientMuon: Muon's orthogonalised step on the quotient of every factored bundle group,
``torch.optim.Muon`` or ``torch.optim.AdamW`` on the plain groups (each group's ``"rule"``).

The class, its state (``MuonState``), its pure bundle update (``muon_bundle_update``) and its
plain update (``muon_plain_updates``; the adamw rule's is ``muon_rules.torch_adamw_updates``).
Theory: docs/theory/optimisers.md#quotientmuon.
"""

from __future__ import annotations

from typing import TypedDict

import torch

from manifolds import Bundle
from manifolds.frame import Frame

from . import validation as rules
from .adam import AdamState
from .base import QuotientOptimizer
from .deferred import deferred_adamw
from .muon_rules import (
    ADAMW_BETAS,
    ADAMW_EPS,
    ADAMW_LR,
    ADAMW_WEIGHT_DECAY,
    RULES,
    check_keys,
    check_rule,
    check_saved_rules,
    default_rule,
    torch_adamw_updates,
)
from .newton_schulz import (
    NS_COEFFICIENTS,
    NS_EPS,
    NS_STEPS,
    SCOPES,
    adjust_lr,
    factored_parts,
    newton_schulz,
    orthogonalise_factors,
)
from .redress import begin_step

__all__ = ["RULES", "MuonState", "QuotientMuon", "muon_bundle_update", "muon_plain_updates"]

Tensors = tuple[torch.Tensor, ...]
_ADJUST = (None, "original", "match_rms_adamw")


class MuonState(TypedDict):
    """QuotientMuon's state of one bundle group (under its first parameter) or one tensor of a
    muon plain group: the momentum, a tuple shaped like the point (horizontal there) or shaped
    like the tensor. A tensor of an adamw plain group holds ``AdamState`` instead."""

    momentum_buffer: torch.Tensor | Tensors


def muon_bundle_update(
    frame: Frame,
    grad: Tensors,
    state: MuonState,
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    nesterov: bool,
    ns_coefficients,
    eps: float,
    ns_steps: int,
    adjust_lr_fn: str | None,
    scope: str,
    maximize: bool = False,
    dress: bool = False,
):
    """One QuotientMuon step on a bundle group at ``frame`` (``bundle.at(point)``), out of
    place (the algorithm of ``QuotientMuon``). Returns ``(new_point, new_state, new_frame)``."""
    frame, grad, (buf,) = begin_step(
        frame, grad, (state["momentum_buffer"],), maximize=maximize, dress=dress
    )
    rgrad = frame.riemannian_gradient(grad)  # horizontal for invariant losses
    buf = tuple(torch.lerp(m, g, 1 - momentum) for m, g in zip(buf, rgrad))
    update = tuple(torch.lerp(g, m, momentum) for g, m in zip(rgrad, buf)) if nesterov else buf
    ns = dict(coefficients=ns_coefficients, steps=ns_steps, eps=eps)
    direction = orthogonalise_factors(frame.bundle, update, scope, adjust_lr_fn, **ns)
    new_point = frame.descend(direction, lr, weight_decay)  # projected, bounded, retracted
    new_frame = frame.moved(new_point)
    return new_point, MuonState(momentum_buffer=new_frame.horizontal(buf)), new_frame


def muon_plain_updates(
    params,
    grads,
    states: list[MuonState],
    *,
    lr,
    weight_decay,
    momentum,
    nesterov,
    ns_coefficients,
    eps,
    ns_steps,
    adjust_lr_fn,
    maximize=False,
    scope=None,  # bundle groups only
    gather=None,
):
    """``torch.optim.Muon``'s update of every (2-D) tensor of a group, out of place.

    ``gather``: for shards of matrices, one ``quotopt.optim.sharding.Gathered`` per tensor:
    Newton–Schulz runs on the whole matrix (all-gathered) and each rank keeps its part."""
    new_params, new_states = [], []
    for index, (param, grad, state) in enumerate(zip(params, grads, states)):
        grad = -grad if maximize else grad
        buf = state["momentum_buffer"].lerp(grad, 1 - momentum)
        update = grad.lerp(buf, momentum) if nesterov else buf
        whole = update if gather is None else gather[index].full(update)
        update = newton_schulz(whole, ns_coefficients, ns_steps, eps)
        update = update if gather is None else gather[index].part(update)
        new = param.mul(1 - lr * weight_decay)
        new.add_(update, alpha=-adjust_lr(lr, adjust_lr_fn, whole.shape))
        new_params.append(new)
        new_states.append(MuonState(momentum_buffer=buf))
    return new_params, new_states


def muon_plain_rules(params, grads, states, *, rule: str, **hyper):
    """A plain group's update by its rule: ``torch.optim.AdamW``'s or ``torch.optim.Muon``'s."""
    update = torch_adamw_updates if rule == "adamw" else muon_plain_updates
    return update(params, grads, states, **hyper)


def muon_plain_deferred(params, grads, states, *, rule: str, **hyper):
    """An ``"adamw"`` group's step taken in place at commit by torch's AdamW where its result
    is known finite beforehand (``quotopt.optim.adam.deferred_adamw``), else None: the group
    is then stepped out of place by ``muon_plain_rules``."""
    return deferred_adamw(params, grads, states, **hyper) if rule == "adamw" else None


class QuotientMuon(QuotientOptimizer):
    r"""Muon on quotient manifolds (a ``torch.optim.Optimizer``), one optimiser for a model.

    Bundle groups must be factored (two factors per head acted on by (A g, B g⁻ᵀ):
    ``HeadQK``, ``HeadOV``, ``RotaryQK``, ``PositiveRescaling``, or products of them). A bundle
    group at p with Euclidean gradient ∇f and momentum m takes the step
    (``muon_bundle_update``)::

        every dress_every steps:  p̄ = p·u(p),  m ← m·u(p),  ∇f ← act_dual(∇f, u(p))
        ξ = grad_metric f(p̄);   m ← μ m + (1 − μ) ξ;   X = (1 − μ) ξ + μ m if nesterov else m
        D = P_H(NS(X_A) · s_A, NS(X_B) · s_B)     # per head (scope="head") or per tensor
        p' = retract(scale_invariants(p̄, 1 − lr·wd), −limit_step(lr·D));  m ← P_H at p'

    NS is torch's Newton–Schulz in the parameters' precision (float32 at least), s the ratio of
    torch's ``adjust_lr_fn`` for a (k, rows) weight (k = r per head, H·r per tensor). Plain
    groups are stepped by their ``"rule"`` (``quotopt.optim.muon_rules``): ``"muon"``, exactly
    ``torch.optim.Muon`` (2-D tensors; the default when all are 2-D), or ``"adamw"``,
    ``torch.optim.AdamW`` with the group's ``"lr"`` (default ``adamw_lr``) and ``"adamw_*"``
    keys (the default otherwise; mark embeddings and the read-out so). A group's rule is fixed
    once it has state. Why it is a step on the quotient, when runs from p and p·g coincide, and
    the rules' table: docs/theory/optimisers.md#quotientmuon.

    Args:
        params: tensors or param groups (``"bundle"``, ``"layout"``, ``"name"`` as in
            ``QuotientAdam``; ``"rule"`` for plain groups).
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn:
            as in ``torch.optim.Muon`` (and its defaults).
        scope: ``"head"`` (default) or ``"tensor"``: what one orthogonalised matrix of a bundle
            group is (the D line of the algorithm).
        maximize: ascend instead.
        dress_every: re-dress bundle groups every ``dress_every`` steps from the first
            (default 1); ``None`` never dresses.
        adamw_lr, adamw_betas, adamw_eps, adamw_weight_decay: the AdamW rule's ``lr``,
            ``betas``, ``eps`` and decoupled ``weight_decay``; defaults 3e-4, (0.9, 0.95), 1e-10
            and 0, those of ``MuonWithAuxAdam``'s Adam groups (Keller Jordan's Muon), with
            torch's AdamW arithmetic.
        nonfinite: ``"raise"`` or ``"skip"`` (see ``QuotientAdam``).

    Raises ValueError (nothing built or changed) for a bundle group with rule ``"adamw"`` or
    without two factors per head, a muon group holding a tensor that is not 2-D, a key of the
    other rule on a group, and an invalid hyperparameter of either rule.

    References: Jordan et al. 2024 (Muon); Bernstein & Newhouse 2024 (steepest descent under
    the spectral norm); Absil, Mahony & Sepulchre 2008 (quotient manifolds).
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
            param_group["rule"] = default_rule(bundle, tensors)
        rule = param_group["rule"]
        if bundle is not None or rule not in RULES:
            self._check_rule(name, param_group)  # a bundle group's rule is Muon's
        if param_group.get("frozen", False) is not True:  # a frozen group is never stepped
            check_keys(name, param_group)
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

    def _init_state(self, group: dict, point: tuple) -> MuonState | AdamState:
        if group.get("bundle") is None and group.get("rule") == "adamw":  # QuotientAdam's
            (param,) = point
            zeros = torch.zeros_like(param, memory_format=torch.preserve_format)
            return AdamState(step=self._zero_step(param), exp_avg=zeros, exp_avg_sq=zeros.clone())
        buffers = tuple(torch.zeros_like(t, memory_format=torch.preserve_format) for t in point)
        return MuonState(momentum_buffer=buffers if group.get("bundle") is not None else buffers[0])

    @staticmethod
    def _stackable(hyper: dict) -> bool:
        """Only per-head scope stacks: ``"tensor"`` orthogonalises a group's factor whole."""
        return hyper["scope"] == "head"

    _bundle_update = staticmethod(muon_bundle_update)
    _plain_update = staticmethod(muon_plain_rules)
    _plain_in_place = staticmethod(muon_plain_deferred)
    _gathers_matrices = staticmethod(lambda group: group["rule"] == "muon")  # Newton–Schulz
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
        check_rule(name, group, getattr(self, "state", {}))

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
        a group saved under another rule (a saved group without a ``"rule"`` is a muon group).
        A group's rule stays this optimiser's."""
        check_saved_rules(state_dict, self.param_groups)
        rules_now = [group["rule"] for group in self.param_groups]
        super().load_state_dict(state_dict)
        for group, rule in zip(self.param_groups, rules_now):
            group["rule"] = rule
