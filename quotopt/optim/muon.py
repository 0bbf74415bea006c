"""QuotientMuon: Muon's orthogonalised step on the quotient of every factored bundle group,
``torch.optim.Muon`` on the other (2-D) groups."""

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

__all__ = ["QuotientMuon"]

_ADJUST = (None, "original", "match_rms_adamw")


class QuotientMuon(QuotientOptimizer):
    r"""Muon on quotient manifolds (a ``torch.optim.Optimizer``).

    Groups without a ``"bundle"`` are exactly ``torch.optim.Muon`` (same hyperparameters, defaults
    and bits; one deliberate exception: for bfloat16 parameters with ``nesterov=False`` torch's
    Newton–Schulz divides its own momentum buffer in place, since ``buf.bfloat16()`` is ``buf``, and
    QuotientMuon leaves the buffer alone) and, like it, take 2-D parameters only: embeddings, norms,
    biases and the read-out belong in an AdamW (or ``QuotientAdam``) optimiser beside it, as Muon's
    authors recommend (``quotopt.baselines.muon`` wraps the pair as one optimiser). Bundle groups
    must be factored bundles — two factors per head, (A g, B g⁻ᵀ) with g in a subgroup of GL(r):
    ``HeadQK``, ``HeadOV``, ``RotaryQK``, ``PositiveRescaling`` (``bundle.factors``) — or
    products of them (``ProductBundle``: fused q/k/v, partial rotary, ``nn.MultiheadAttention``),
    whose components are dressed and orthogonalised one by one.

    **The step** (``quotopt.optim.orthogonal.muon_bundle_update``), on a group at p with
    Euclidean gradient ∇f and momentum m:

    1. re-dress (every ``dress_every`` steps; default every step): p̄ = p·u(p), m ← m·u(p),
       ∇f ← act_dual(∇f, u(p)) — p̄ is the balanced representative, AᵀA = BᵀB = S diagonal
       per head, with the bundle's sign rule;
    2. ξ = grad_metric f(p̄) (horizontal for a G-invariant loss);
       m ← μm + (1−μ)ξ; X = (1−μ)ξ + μm with ``nesterov``, else X = m (torch's rule);
    3. D = (NS(X_A), NS(X_B)) per factor — Newton–Schulz with torch's coefficients, per head
       (``scope="head"``: each rows×r factor) or per tensor (``"tensor"``: the rows×(H·r)
       matrix of all heads, the projection as a torch layer stores it), each factor scaled
       by torch's ``adjust_lr_fn`` ratio for a (k, rows) weight, k = r or H·r
       (``None``/``"original"``: √max(1, k/rows), 1 for heads with H·r ≤ d;
       ``"match_rms_adamw"``: 0.2·√max(k, rows), for which AdamW's lr and wd carry over);
       then D ← P_H(D);
    4. p' = retract(scale_invariants(p̄, 1 − lr·wd), −limit_step(lr·D));
       m ← transport to p' (horizontal projection there).

    **Why it is a step on the quotient.** The dressing field satisfies u(p·g) = g⁻¹u(p), so
    p̄ = (p·g)·u(p·g) = p·u(p) depends on the orbit only; ∇f(p·g) = act_dual(∇f(p), g) for
    an invariant loss, so the gradient at p̄ is the same from any representative; and the
    momentum, pushed forward by the same element as the point (the action is linear, so it is
    its own differential), arrives at p̄ as the same vector. Steps 2–4 are functions of
    (p̄, m̄, ∇f(p̄)) alone. By induction, runs started from p and from p·g coincide after their
    first dressing — the iterates themselves, not only their orbits — and the step is a map
    on P/G (with momentum on its horizontal bundle).

    **Why orthogonalise there.** Muon is steepest descent under the spectral norm: the
    minimiser of ⟨G, D⟩ over ‖D‖_op ≤ 1 is −polar(G), and max(‖D_A‖_op, ‖D_B‖_op) gives
    −(polar(G_A), polar(G_B)) per factor. polar commutes with orthogonal changes of basis only
    (polar(Ag) ≠ polar(A)g for g ∉ O(r)), so on raw factors Muon's step depends on the gauge
    (the control in ``tests/test_muon.py``). Evaluated at p̄ the spectral norms are functions of
    the orbit: a norm on the quotient's tangent spaces. With the Euclidean metric at p̄ = (US^½,
    VS^½) (M = USVᵀ), ξ = (GVS^½, GᵀUS^½) for G = ∂f/∂M. The projection P_H drops the vertical
    part, which moves M only at second order (δM = AξBᵀ − AξBᵀ = 0 at first order), so the first-
    order change of M is the steepest-descent one and the momentum stays horizontal.

    **When runs from p and p·g coincide** (to round-off, times the conditioning of u and the
    trajectory's growth of perturbations): whenever every head is dressable at every dressing
    — factor Grams with smallest eigenvalue above 1e-12 of the largest (``dressing_or_identity``;
    a non-dressable head stays where it is and its step depends on the gauge beyond O(r)). Ties
    do not break it: the balanced section is fixed up to the orthogonal stabiliser of S (the
    sign rule, and rotations inside groups of equal singular values of M, where the dressing
    is ambiguous and round-off picks the representative), and Newton–Schulz (NS(XK) = NS(X)K
    for orthogonal K), both metrics, P_H, ``limit_step``, the decay and the transport all
    commute with orthogonal K (step(p̄K) = step(p̄)·K for every orthogonal K, so near-ties,
    where u amplifies round-off, are harmless too) — the two runs then differ by K, on the same
    orbits. With
    ``dress_every = k > 1`` runs still coincide (dressing at step 1) but between dressings
    the step depends on the representative, so it is no longer a map on the quotient;
    ``dress_every=None`` is the gauge-dependent control.

    **Newton–Schulz, not an exact polar factor** (SVD of the rows×r factor or r×r
    eigendecomposition of its Gram): NS is matmuls only (5 × (4·rows·r² + 2r³) flops per factor
    and head, batched by ``baddbmm``; the dressing adds one r×r SVD per head, reusing the point's
    frame, and writes the dressed point's frame down, ``Bundle.redress``), maps null directions
    to zero without a threshold, and has bounded gain (the five-fold quintic's slope at 0 is
    a⁵ ≈ 485), whereas the
    exact polar factor's derivative grows like 1/σ_min of the momentum, amplifying the round-off
    difference of two gauge-equivalent runs without bound. It runs in the parameters' precision
    (float32 at least), not torch's bfloat16: bfloat16 rounding (≈ 4e-3) of two inputs equal to
    round-off can differ by an ulp and would break equivariance at 1e-6. Like torch's, it returns
    US'Vᵀ with S' between about 0.5 and 1.5, not UVᵀ.

    Weight decay is decoupled and acts on the invariants (M ↦ (1 − lr·wd)M, each factor by
    √(1 − lr·wd)); torch's Muon on both factors would shrink M by (1 − lr·wd)².

    Args:
        params: tensors or param groups (``"bundle"``, ``"layout"``, ``"name"`` as in
            ``QuotientAdam``).
        lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn:
            as in ``torch.optim.Muon`` (and its defaults).
        scope: ``"head"`` (default) or ``"tensor"``: what one orthogonalised matrix of a bundle
            group is (step 3).
        maximize: ascend instead.
        dress_every: re-dress bundle groups every ``dress_every`` steps from the first
            (default 1); ``None`` never dresses.
        nonfinite: ``"raise"`` or ``"skip"`` (see ``QuotientAdam``).
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
        nonfinite: str = "raise",
    ):
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
        if bundle is None and param_group.get("frozen", False) is not True:  # frozen: any shape
            for i, p in enumerate(params):
                if isinstance(p, torch.Tensor) and p.is_complex():
                    raise ValueError(f"{name}: params[{i}] is complex; Muon takes real matrices")
                if isinstance(p, torch.Tensor) and p.dim() != 2:
                    raise ValueError(
                        f"{name}: QuotientMuon (like torch.optim.Muon) updates 2-D parameters "
                        f"only, but params[{i}] has shape {tuple(p.shape)}; put embeddings, "
                        "norms, biases and other non-matrix parameters in an AdamW optimiser "
                        "(quotopt.baselines.muon.MuonWithAdamW holds both)"
                    )
        elif isinstance(bundle, Bundle):
            try:
                factored_parts(bundle, self._views(param_group, params))
            except NotImplementedError as error:
                raise ValueError(
                    f"{name}: QuotientMuon orthogonalises the two factors of each head, but "
                    f"{bundle!r} has none in some part ({error}); use QuotientAdam for this group"
                ) from None
        super().add_param_group(param_group)

    def _init_state(self, group: dict, point: tuple) -> dict:
        buffers = tuple(torch.zeros_like(t, memory_format=torch.preserve_format) for t in point)
        return {"momentum_buffer": buffers if group.get("bundle") is not None else buffers[0]}

    _plain_update = staticmethod(muon_plain_updates)
    _bundle_update = staticmethod(muon_bundle_update)
    _checked_state = ("momentum_buffer",)  # an infinite buffer would normalise to zero steps

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

    def _hyperparameters(self, group: dict) -> dict:
        names = (
            "lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps",
            "ns_steps", "adjust_lr_fn", "scope", "maximize",
        )  # fmt: skip
        return {k: group[k] for k in names}
