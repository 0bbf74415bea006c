r"""The teacher regression's targets and its balanced point (docs/theory/flat-directions.md).

A regression of a model's outputs on a teacher's, F(θ) = ½‖y(θ) − y*‖² + (λ/2)‖θ‖², has a
critical point exactly at the teacher θ₀ when y* = y(θ₀) + (J₀ᵀ)⁺ λθ₀ (``teacher_targets``),
which needs θ₀ orthogonal to every non-compact orbit direction of the loss: its balanced point
(``balance_teacher``). With λ = 0 the teacher is an exact interpolating minimum.
``TeacherRegression`` is the task: the teacher's outputs on random sequences, the training
targets shifted so.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...dynamics.hessian import flatten
from ...groups import group_point, write_point

__all__ = ["teacher_targets", "balance_teacher", "TeacherRegression"]


def teacher_targets(
    outputs: Callable, params, weight_decay: float = 0.0, *, rtol: float = 1e-10
) -> torch.Tensor:
    """Regression targets y* that make ``params`` a critical point of
    F(θ) = ½‖y(θ) − y*‖² + (λ/2)‖θ‖², y = ``outputs(*params)``: y* = y(θ₀) + (J₀ᵀ)⁺ λθ₀
    (J₀ the Jacobian at θ₀). With λ = 0 the teacher θ₀ is an exact interpolating minimum
    (its whole orbit is flat); with λ > 0, ∇F(θ₀) = λ(I − P)θ₀ with P the projection onto
    range J₀ᵀ, which vanishes where θ₀ is orthogonal to ker J₀ (balanced heads) — refine
    from there. The pseudo-inverse drops singular values below ``rtol``·σ_max, so that J₀'s
    exact kernel (every orbit direction, declared or not, at round-off) is never divided by;
    ∇F(θ₀) then keeps λ times θ₀'s component along it, which refinement removes. A symmetry
    broken only weakly (the relational model's stream scale, σ ≈ 8e-7·σ_max) stays above any
    such cut: θ₀ must be balanced along it (``balance_teacher``), or the shift divides λθ₀'s
    component along it by σ and the targets blow up."""
    params = tuple(p.detach() for p in params)
    with sdpa_kernel(SDPBackend.MATH):
        y0 = outputs(*params).detach().reshape(-1)
        if not weight_decay:
            return y0
        jac = _jacobian(lambda *ps: outputs(*ps).reshape(-1), params)  # (m, n)
    return y0 + torch.linalg.pinv(jac.mT, rtol=rtol) @ (weight_decay * flatten(params))


def _jacobian(flat_outputs: Callable, params, chunk: int = 256) -> torch.Tensor:
    """(m, n) Jacobian of ``flat_outputs`` at ``params``: reverse mode, ``chunk`` rows at a
    time (vectorised over the chunk's unit cotangents; a loop for autograd.Functions without
    vmap rules), so that memory is ``chunk`` backward passes, not m."""
    leaves = tuple(p.detach().clone().requires_grad_(True) for p in params)
    with torch.enable_grad():
        y = flat_outputs(*leaves)
    m, rows = y.numel(), []
    for start in range(0, m, chunk):
        index = torch.arange(start, min(start + chunk, m), device=y.device)
        cotangents = y.new_zeros(index.numel(), m)
        cotangents[torch.arange(index.numel(), device=y.device), index] = 1.0
        try:
            grads = torch.autograd.grad(
                y,
                leaves,
                cotangents,
                retain_graph=True,
                is_grads_batched=True,
                allow_unused=True,
            )
        except RuntimeError:
            grads = zip(
                *(
                    torch.autograd.grad(y, leaves, c, retain_graph=True, allow_unused=True)
                    for c in cotangents
                )
            )
            grads = [None if g[0] is None else torch.stack(g) for g in grads]
        rows.append(
            torch.cat(
                [
                    y.new_zeros(index.numel(), p.numel())
                    if g is None
                    else g.reshape(index.numel(), -1)
                    for g, p in zip(grads, leaves)
                ],
                1,
            )
        )
    return torch.cat(rows)


@torch.no_grad()
def balance_teacher(model, groups, *, max_passes: int = 500, tol: float = 1e-13) -> int:
    """Move ``model`` (in place) to its balanced point, where θ is orthogonal to every
    non-compact orbit direction of its loss — the point that ``teacher_targets`` needs for
    λ > 0. Alternates the dressing of every group in ``groups`` with the model's own
    ``balance_undeclared`` where it has one (the relational model's MLP rescalings and
    stream scale, which share tensors with the declared groups) until a pass moves θ by at
    most ``tol``·‖θ‖. Each stage lowers ‖θ‖ along its orbit, so the alternation converges;
    returns the number of passes (ValueError if ``max_passes`` did not reach ``tol``)."""
    undeclared = getattr(model, "balance_undeclared", None)
    for passes in range(1, max_passes + 1):
        before = torch.cat([p.reshape(-1) for p in model.parameters()])
        for group in groups:
            write_point(group, group["bundle"].dress(tuple(t.detach() for t in group_point(group))))
        if undeclared is None:
            return passes  # the groups' dressings alone: one pass is the balanced point
        undeclared()
        after = torch.cat([p.reshape(-1) for p in model.parameters()])
        if float((after - before).norm()) <= tol * float(after.norm()):
            return passes
    raise ValueError(f"balance_teacher: {max_passes} passes did not move θ by under {tol:g}")


class TeacherRegression:
    """Regress a model's outputs on a random teacher's, ½ Σ ‖y − y*‖² over full batches.

    ``batch(split, None)`` gives (tokens, teacher outputs) of the ``"train"`` or ``"val"``
    sequences; ``evaluate(model, split)`` returns the loss per output and ``r2`` = 1 −
    Σ(y − y*)² / Σ(y* − ȳ*)² (the validation metric)."""

    kind = "regression"

    def __init__(
        self, teacher: nn.Module, vocab, seq_len, n_train, n_val, seed=0, weight_decay=0.0
    ):
        gen = torch.Generator().manual_seed(seed)
        tokens = torch.randint(0, vocab, (n_train + n_val, seq_len), generator=gen)
        with torch.no_grad():
            targets = teacher(tokens)
        if weight_decay:  # the training targets that make the teacher critical for F
            names = [n for n, _ in teacher.named_parameters()]
            train = tokens[:n_train]
            outputs = lambda *ps: functional_call(teacher, dict(zip(names, ps)), (train,))  # noqa: E731
            shifted = teacher_targets(outputs, tuple(teacher.parameters()), weight_decay)
            targets = torch.cat([shifted.reshape(targets[:n_train].shape), targets[n_train:]])
        self.data = {
            "train": (tokens[:n_train], targets[:n_train]),
            "val": (tokens[n_train:], targets[n_train:]),
        }

    def batch(self, split, batch_size=None):
        return self.data[split]

    def logits(self, model, x):
        return model(x)

    def loss(self, outputs, y):
        return 0.5 * (outputs - y).square().sum()

    @torch.no_grad()
    def evaluate(self, model, split="val") -> dict[str, float]:
        x, y = self.data[split]
        residual = (model(x) - y).square().sum()
        spread = (y - y.mean()).square().sum()
        return {"loss": float(residual) / y.numel(), "r2": float(1 - residual / spread)}
