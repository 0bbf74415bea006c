"""The two rules of QuotientMuon's plain groups (a group's ``"rule"``): ``"muon"``,
``torch.optim.Muon`` on 2-D tensors, and ``"adamw"``, ``torch.optim.AdamW`` on any tensor —
the default for each group, the keys each rule accepts, the checks that a group's rule fits its
tensors and state, and the adamw rule's update (``torch_adamw_updates``).

The arrangement is Keller Jordan's ``MuonWithAuxAdam`` (groups with ``use_muon=False`` run Adam
with their own lr, betas, eps and weight decay), whose Adam defaults the adamw rule takes.
"""

from __future__ import annotations

import torch

from . import validation as rules
from .adam import AdamState, adam_plain_updates

__all__ = [
    "ADAMW_BETAS",
    "ADAMW_EPS",
    "ADAMW_LR",
    "ADAMW_WEIGHT_DECAY",
    "RULES",
    "check_keys",
    "check_rule",
    "check_saved_rules",
    "default_rule",
    "torch_adamw_updates",
]

#: how a plain group is stepped (its ``"rule"``): torch.optim.Muon or torch.optim.AdamW
RULES = ("muon", "adamw")
#: the AdamW rule's defaults: those of the Adam groups (``use_muon=False``) of ``MuonWithAuxAdam``
#: in Keller Jordan's Muon repository
ADAMW_LR = 3e-4
ADAMW_BETAS = (0.9, 0.95)
ADAMW_EPS = 1e-10
ADAMW_WEIGHT_DECAY = 0.0
#: keys of an adamw group that would be Muon's (and ignored) there, with the key meant
_ADAMW_SPELLING = {"weight_decay": "adamw_weight_decay", "eps": "adamw_eps", "betas": "adamw_betas"}


def default_rule(bundle, tensors: list) -> str:
    """``"muon"`` for a bundle group or a group of 2-D tensors only, else ``"adamw"``."""
    return "muon" if bundle is not None or all(p.dim() == 2 for p in tensors) else "adamw"


def check_keys(name: str, group: dict) -> None:
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


def check_rule(name: str, group: dict, state) -> None:
    """The group's rule fits its tensors and its ``state`` (the optimiser's; a scheduler, or a
    hand, may change a group's keys between steps)."""
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
    for i, p in enumerate(params):
        held = state.get(p) if isinstance(p, torch.Tensor) else None
        if held and ("exp_avg" in held) != (rule == "adamw"):
            raise ValueError(
                f"{name}: rule is {rule!r} but params[{i}] holds the state of the other "
                f"rule ({sorted(held)}); a group's rule is fixed once it has state"
            )


def check_saved_rules(state_dict, groups: list[dict]) -> None:
    """Refuse a ``state_dict`` whose groups were saved under another rule than ``groups``'
    (a saved group without a rule is Muon's)."""
    saved_groups = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
    if not isinstance(saved_groups, list) or len(saved_groups) != len(groups):
        return
    for saved, group in zip(saved_groups, groups):
        saved_rule = saved.get("rule", "muon") if isinstance(saved, dict) else None
        if saved_rule is not None and saved_rule != group["rule"]:
            raise ValueError(
                f"{group['name']}: state_dict was saved for rule {saved_rule!r}, this "
                f"group has rule {group['rule']!r}"
            )


def torch_adamw_updates(
    params: list,
    grads: list,
    states: list[AdamState],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> tuple[list, list[AdamState]]:
    """``torch.optim.AdamW``'s update, bit for bit where torch steps tensor by tensor (its
    default on the CPU): torch's operations in torch's order — decay, moments, the bias
    corrections as Python floats from the step count read on the host, then one ``addcdiv``,
    which rounds ``lr·m / (√v̂ + ε)`` differently from ``adam_plain_updates``' separate division
    and product (an ulp in a few percent of the entries, every step). Groups with a tensor
    off the CPU go to ``adam_plain_updates`` (multi-tensor kernels, bias corrections on the
    device: no host synchronisation), equal to torch's to rounding. States as
    ``adam_plain_updates``'; the step counter's device is the parameter's."""
    if any(p.device.type != "cpu" for p in params):
        hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
        return adam_plain_updates(params, grads, states, maximize=maximize, **hyper)
    new_params, new_states = [], []
    for param, grad, state in zip(params, grads, states):
        grad = -grad if maximize else grad
        step = state["step"] + 1
        new = param.mul(1 - lr * weight_decay) if weight_decay != 0 else param.clone()
        exp_avg = state["exp_avg"].lerp(grad, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        count = step.item()  # a CPU scalar: no synchronisation
        bias_1, bias_2 = 1 - beta1**count, 1 - beta2**count
        denom = (exp_avg_sq.sqrt() / bias_2**0.5).add_(eps)
        new.addcdiv_(exp_avg, denom, value=-(lr / bias_1))
        new_params.append(new)
        new_states.append(AdamState(step=step, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq))
    return new_params, new_states
