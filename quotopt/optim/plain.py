"""torch's AdamW and SGD updates on many tensors at once, out of place.

The parameter groups without a bundle follow ``torch.optim.AdamW`` / ``torch.optim.SGD``
exactly; these functions compute their new values for every tensor of a group together, with
torch's multi-tensor (``_foreach``) kernels where the rule allows, and write nothing: the
optimiser commits them only if the step is finite.
"""

from __future__ import annotations

import torch

__all__ = [
    "CHUNK_ELEMENTS",
    "HOLD_ELEMENTS",
    "adam_plain_in_place",
    "adam_plain_updates",
    "sgd_plain_updates",
    "torch_adamw_updates",
]

Tensors = list[torch.Tensor]


def _moments(states: list[dict], grads: Tensors, beta1: float, beta2: float, in_place=False):
    """AdamW's (step + 1, m, v) of ``states`` after ``grads``: new tensors, or the states'
    own advanced in place (``in_place``), by the same operations, hence the same values."""
    counters = [s["step"] for s in states]
    if in_place:
        ms, vs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        torch._foreach_lerp_(ms, grads, 1 - beta1)
        torch._foreach_mul_(vs, beta2)
        torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
        torch._foreach_add_(counters, 1)
        return counters, ms, vs
    steps = torch._foreach_add(counters, 1)
    ms = torch._foreach_lerp([s["exp_avg"] for s in states], grads, 1 - beta1)
    vs = torch._foreach_mul([s["exp_avg_sq"] for s in states], beta2)
    torch._foreach_addcmul_(vs, grads, grads, 1 - beta2)
    return steps, ms, vs


def _update(steps, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps) -> Tensors:
    """lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε) in new buffers, the bias corrections in
    float64 as torch computes them with Python floats."""
    bias_1 = torch._foreach_pow(beta1, steps)  # β₁ᵗ, then 1 − β₁ᵗ
    torch._foreach_neg_(bias_1)
    torch._foreach_add_(bias_1, 1)
    bias_2_sqrt = torch._foreach_pow(beta2, steps)
    torch._foreach_neg_(bias_2_sqrt)
    torch._foreach_add_(bias_2_sqrt, 1)
    torch._foreach_sqrt_(bias_2_sqrt)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, bias_2_sqrt)
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avg, denom)
    torch._foreach_mul_(update, [lr / b for b in bias_1])  # lr / (1 − β₁ᵗ): torch's rounding
    return update


def adam_plain_updates(
    params: Tensors,
    grads: Tensors,
    states: list[dict],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> tuple[Tensors, list[dict]]:
    """``torch.optim.AdamW``'s update of every tensor of a group: (new params, new states)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    steps, exp_avg, exp_avg_sq = _moments(states, grads, beta1, beta2)
    update = _update(steps, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps)
    new_params = torch._foreach_mul(params, 1 - lr * weight_decay)
    torch._foreach_sub_(new_params, update)
    new_states = [
        {"step": step, "exp_avg": m, "exp_avg_sq": v}
        for step, m, v in zip(steps, exp_avg, exp_avg_sq)
    ]
    return new_params, new_states


#: elements of a group whose moments are computed together (``adam_plain_in_place``): the
#: transient memory of a plain step, beyond the new parameters it holds, is about three times
#: this (or the largest tensor) in the parameters' dtype
CHUNK_ELEMENTS = 1 << 22


#: groups with more elements than this do not hold their new parameters until the commit
#: (``adam_plain_in_place``)
HOLD_ELEMENTS = 1 << 24


def _chunks(params: Tensors):
    """Index lists of consecutive tensors with at most ``CHUNK_ELEMENTS`` elements together
    (a larger tensor alone)."""
    chunk, size = [], 0
    for i, p in enumerate(params):
        if chunk and size + p.numel() > CHUNK_ELEMENTS:
            yield chunk
            chunk, size = [], 0
        chunk.append(i)
        size += p.numel()
    if chunk:
        yield chunk


def adam_plain_in_place(
    params: Tensors,
    grads: Tensors,
    states: list[dict],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
):
    """``adam_plain_updates`` as a plan: returns ``(new_params, checks, commit)``; ``checks``
    are the sums of the new second moments (a value that overflows would make the step zero
    instead of reaching the parameters, so the guard checks it) and ``commit(ok)`` writes the
    new state (where ``ok`` is a device flag, only if it is set). The update is computed chunk
    by chunk (``CHUNK_ELEMENTS``).

    A group of at most ``HOLD_ELEMENTS`` elements holds its new parameters and moments until
    the commit. A larger group holds neither: its moments are dropped once they have formed the
    new parameters, whose sums join ``checks``, and ``commit`` advances the moments in place and
    forms the new parameters again from them — the same operations, hence the same values, at
    the price of computing the update twice — so that the transient memory of a plain step
    stays near ``CHUNK_ELEMENTS`` whatever the model's size (torch's AdamW holds one tensor's
    denominator). New parameters equal ``adam_plain_updates``', bit for bit, either way."""
    signed = torch._foreach_neg(grads) if maximize else list(grads)
    hold = sum(p.numel() for p in params) <= HOLD_ELEMENTS
    new_params: list[torch.Tensor] = []
    checks: list[torch.Tensor] = []

    def moments(chunk, in_place: bool = False):
        gs = [signed[i] for i in chunk]
        return _moments([states[i] for i in chunk], gs, beta1, beta2, in_place)

    def update(steps, exp_avg, exp_avg_sq):
        return _update(steps, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2, eps=eps)

    kept = []  # a held group's new moments, committed as they are
    for chunk in _chunks(params):
        steps, exp_avg, exp_avg_sq = moments(chunk)
        checks.extend(v.sum() for v in exp_avg_sq)
        step = update(steps, exp_avg, exp_avg_sq)
        new = torch._foreach_mul([params[i] for i in chunk], 1 - lr * weight_decay)
        torch._foreach_sub_(new, step)
        if hold:
            new_params.extend(new)
            kept.extend(zip(chunk, steps, exp_avg, exp_avg_sq))
        else:
            checks.extend(p.sum() for p in new)

    def commit(ok) -> None:
        for i, t, m, v in kept:
            new = {"step": t, "exp_avg": m, "exp_avg_sq": v}
            if ok is not None:  # a device flag: masked
                new = {k: torch.where(ok, x, states[i][k]) for k, x in new.items()}
            states[i].update(new)
        if hold:
            return
        for chunk in _chunks(params):
            if ok is None:
                steps, exp_avg, exp_avg_sq = moments(chunk, in_place=True)
                step = update(steps, exp_avg, exp_avg_sq)
                ps = [params[i] for i in chunk]
                torch._foreach_mul_(ps, 1 - lr * weight_decay)
                torch._foreach_sub_(ps, step)
                continue
            for i in chunk:  # a device flag: masked, tensor by tensor
                (t,), (m,), (v,) = moments([i])
                (s,) = update([t], [m], [v])
                new = params[i].mul(1 - lr * weight_decay).sub_(s)
                params[i].copy_(torch.where(ok, new, params[i]))
                state = states[i]
                for key, value in (("exp_avg", m), ("exp_avg_sq", v), ("step", t)):
                    state[key].copy_(torch.where(ok, value, state[key]))

    return new_params, checks, commit


def torch_adamw_updates(
    params: Tensors,
    grads: Tensors,
    states: list[dict],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    maximize: bool = False,
) -> tuple[Tensors, list[dict]]:
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
        new_states.append({"step": step, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq})
    return new_params, new_states


def sgd_plain_updates(
    params: Tensors,
    grads: Tensors,
    states: list[dict],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool = False,
) -> tuple[Tensors, list[dict]]:
    """``torch.optim.SGD``'s update (coupled L2 decay) of every tensor of a group."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    new_states = [{"step": state["step"] + 1} for state in states]
    if momentum:
        directions = []
        for grad, state, new_state in zip(grads, states, new_states):
            # torch's rule: the first buffer is the gradient itself (a where: no host read)
            buf = torch.where(
                state["step"] == 0,
                grad,
                momentum * state["momentum_buffer"] + (1 - dampening) * grad,
            )
            new_state["momentum_buffer"] = buf
            directions.append(grad + momentum * buf if nesterov else buf)
        grads = directions
    return torch._foreach_add(params, grads, alpha=-lr), new_states
