r"""Every optimiser the laboratory runs, one ``OptimizerSpec`` each (``optimizer_spec``).

Settings: ``"full"`` builders take every parameter of a model; ``"lora"`` builders take the
trainable adapter factors (B, A) of a model whose other parameters are frozen (B = 0 at the
start); both read the groups the run detected from ``build.groups``.

LoRA references: LoRA+ (Hayou, Ghosh & Yu, ICML 2024); Riemannian preconditioning (scaled GD,
Zhang & Pilanci, ICML 2024, as ``peft.optimizers.create_riemannian_optimizer`` ships it:
gradients (∇_B (AAᵀ + δI)⁻¹, (BᵀB + δI)⁻¹ ∇_A), then AdamW per coordinate; its SGD form with
δ = 0 is QuotientSGD under the invariant metric); LoRA-RITE (Yen et al., ICLR 2025, the
defaults of the authors' PyTorch reimplementation); BaLoRA (Castin, Nadjahi, Ablin & Peyré,
ICML 2026). On adapters the invariant metric is damped by δ = ``damping``:
⟨U, V⟩ = tr((AAᵀ + δI)U_BᵀV_B) + tr((BᵀB + δI)U_A V_Aᵀ). ``qmuon`` on adapters first moves
each B = 0 adapter along its orbit to A with orthonormal rows (``quotopt.groups.orthonormal_start``)
so that the first step does not depend on A's gauge. Riemannion (Bogachev et al., ICLR 2026):
Muon on the manifold of rank-r matrices, its step scaled to AdamW's RMS so that the lr grid
carries over; ``riemannion-mom`` carries Muon's momentum buffer between steps instead of the
orthogonalised direction (docs/theory/lora.md).
"""

from __future__ import annotations

import torch

from ...groups import lora_pairs, orthonormal_start
from ...optim import QuotientAdam, QuotientMuon, QuotientSGD
from ...optim.matrix_adam import QuotientMatrixAdam
from .. import baselines
from ..baselines.balora import balora
from ..baselines.riemannion import riemannion
from .optimizer_spec import Build, OptimizerSpec

__all__ = ["CATALOGUE"]

#: Nanda et al. 2023 (modadd) and minGPT (sort, chars): AdamW's (lr, weight decay)
_ADAM = {"*": (1e-3, 0.1), "modadd": (1e-3, 1.0), "sort": (5e-4, 0.1), "chars": (2e-3, 0.1)}
_SGD = {"*": (0.1, 0.0)}


def _adapters(model) -> list[torch.nn.Parameter]:
    pairs = lora_pairs(model)
    if not pairs:
        raise ValueError("the model has no trainable LoRA adapters to optimise")
    return [p for _, b, a in pairs for p in (a, b)]


def _baseline(factory):
    """A builder from a ``factory(model, lr, weight_decay, betas)`` of ``quotopt.lab.baselines``."""
    return lambda b: factory(b.model, b.lr, b.weight_decay, b.betas)


def _riemannion(store: str):
    """Riemannion's builder, carrying ``store`` ("direction" or "momentum") between steps."""
    return lambda b: riemannion(
        b.model, b.lr, b.weight_decay, b.betas, adjust_lr_fn="match_rms_adamw", store=store
    )


def _adamw(b: Build):
    return torch.optim.AdamW(b.model.parameters(), b.lr, b.betas, weight_decay=b.weight_decay)


def _adamw_adapters(b: Build):
    return torch.optim.AdamW(_adapters(b.model), b.lr, b.betas, weight_decay=b.weight_decay)


def _qadam(b: Build):
    return QuotientAdam(b.groups, lr=b.lr, betas=b.betas, weight_decay=b.weight_decay)


def _qsgd(b: Build):
    return QuotientSGD(b.groups, b.lr, momentum=0.9, weight_decay=b.weight_decay)


def _sgd(b: Build):
    return torch.optim.SGD(b.model.parameters(), b.lr, momentum=0.9, weight_decay=b.weight_decay)


def _qmuon(b: Build):
    return baselines.quotient_muon_adamw(b.model, b.lr, b.weight_decay, b.betas, groups=b.groups)


def _qmuon_adapters(b: Build):
    orthonormal_start(b.model)  # in place, before the groups are read
    return QuotientMuon(
        b.groups, b.lr, b.weight_decay, scope="head", adjust_lr_fn="match_rms_adamw"
    )


def _loraplus(b: Build):
    return baselines.lora_plus(b.model, b.lr, b.weight_decay, b.betas, ratio=b.ratio)


def _scaledgd(b: Build):
    from peft.optimizers import create_riemannian_optimizer

    _adapters(b.model)
    kw = dict(lr=b.lr, reg=b.damping, betas=b.betas, weight_decay=b.weight_decay)
    return create_riemannian_optimizer(b.model, torch.optim.AdamW, **kw)


def _qadam_mat(b: Build):
    return QuotientMatrixAdam(b.model, b.lr, b.betas, weight_decay=b.weight_decay)


def _both(builder):
    return {"full": builder, "lora": builder}


_HEADS = "*reduces* GL(r) per head"
CATALOGUE: tuple[OptimizerSpec, ...] = (
    OptimizerSpec(
        name="adamw",
        label="AdamW",
        role="no geometry: every gauge direction is one more direction the step moves in.",
        family="adam",
        quotient=False,
        build={"full": _adamw, "lora": _adamw_adapters},
        defaults=_ADAM,
    ),
    OptimizerSpec(
        name="qadam",
        label="QuotientAdam",
        role=f"{_HEADS}: Adam on the quotient, re-dressed onto the balanced section, with "
        "gauge-invariant second moments.",
        family="adam",
        quotient=True,
        build=_both(_qadam),
        defaults=_ADAM,
    ),
    OptimizerSpec(
        name="qadam-inv",
        label="QuotientAdam (invariant metric)",
        role=f"{_HEADS} under the GL-invariant metric (the factor Hessian of least squares), "
        "so the geometry alone is equivariant.",
        family="adam",
        quotient=True,
        build=_both(_qadam),
        metric="invariant",
        defaults=_ADAM,
        secondary="damping",
    ),
    OptimizerSpec(
        name="sgd",
        label="SGD (momentum 0.9)",
        role="no geometry, no adaptivity: the Euclidean counterpart of QuotientSGD.",
        family="sgd",
        quotient=False,
        build={"full": _sgd},
        defaults=_SGD,
    ),
    OptimizerSpec(
        name="qsgd",
        label="QuotientSGD (momentum 0.9)",
        role=f"{_HEADS} without adaptivity: the Riemannian gradient on the quotient with momentum.",
        family="sgd",
        quotient=True,
        build={"full": _qsgd},
        defaults=_SGD,
    ),
    # baselines of the study (quotopt.lab.baselines); each may change the model before optimising it
    OptimizerSpec(
        name="geoopt-stiefel",
        label="geoopt RiemannianAdam, heads on Stiefel",
        role="*constrains* instead of reducing: W_q, W_k and W_v on the Stiefel manifold, so "
        "each head's W_q W_kᵀ has unit singular values (a smaller model, not a quotient).",
        family="adam",
        quotient=False,
        build={"full": _baseline(baselines.geoopt_stiefel_adam)},
        defaults=_ADAM,
    ),
    OptimizerSpec(
        name="randbias",
        label="AdamW + random fixed q/v biases",
        role="*breaks* the symmetry: fixed random q/v biases shrink GL(r) to the stabiliser of "
        "the bias, of dimension r² − r, so most gauge directions remain.",
        family="adam",
        quotient=False,
        build={"full": _baseline(baselines.random_bias_adamw)},
        defaults=_ADAM,
    ),
    OptimizerSpec(
        name="gaugefix",
        label="AdamW, gauge fixed W_Q = I, W_V = I",
        role="*fixes* the gauge: a global section (each head's top r×r block of W_Q and W_V "
        "held at the identity), defined only where that block is invertible.",
        family="adam",
        quotient=False,
        build={"full": _baseline(baselines.gauge_fixed_adamw)},
        defaults=_ADAM,
    ),
    OptimizerSpec(
        name="grokfast",
        label="Grokfast-EMA AdamW",
        role="changes the dynamics, not the geometry: an exponential average of past "
        "gradients amplifies their slow component.",
        family="adam",
        quotient=False,
        build={"full": _baseline(baselines.grokfast)},
        defaults=_ADAM,
    ),
    # Muon's update is scaled to AdamW's RMS (match_rms_adamw), so AdamW's (lr, wd) carry over
    OptimizerSpec(
        name="muon",
        label="Muon (+ AdamW)",
        role="respects O(d) and O(r) per head (orthogonalisation commutes with orthogonal "
        "changes of basis) but not GL(r).",
        family="adam",
        quotient=False,
        build={"full": _baseline(baselines.muon_adamw)},
        defaults=_ADAM,
    ),
    OptimizerSpec(
        name="qmuon",
        label="QuotientMuon (+ Muon, AdamW)",
        role=f"{_HEADS}: Muon's orthogonalised step taken at the balanced representative and "
        "lifted horizontally.",
        family="adam",
        quotient=True,
        build={"full": _qmuon, "lora": _qmuon_adapters},
        defaults=_ADAM,
    ),
    # LoRA adapters only
    OptimizerSpec(
        name="loraplus",
        label="LoRA+",
        role="no geometry: AdamW with B's learning rate a fixed ratio times A's, a hand-set "
        "balance between the factors of each adapter.",
        family="adam",
        quotient=False,
        build={"lora": _loraplus},
        secondary="ratio",
    ),
    OptimizerSpec(
        name="scaledgd",
        label="Riemannian-preconditioned AdamW (scaled GD)",
        role="preconditions each factor by the other's damped Gram, then normalises per "
        "coordinate as AdamW does, which undoes most of the r × r scaling.",
        family="adam",
        quotient=False,
        build={"lora": _scaledgd},
    ),
    OptimizerSpec(
        name="qsgd-inv",
        label="QuotientSGD (invariant metric, momentum 0.9)",
        role="*reduces* GL(r) per adapter without adaptivity: scaled GD with momentum on the "
        "quotient under the damped invariant metric.",
        family="sgd",
        quotient=True,
        build={"lora": _qsgd},
        metric="invariant",
        secondary="damping",
    ),
    OptimizerSpec(
        name="lora-rite",
        label="LoRA-RITE",
        role="makes Adam's second moment transformation-invariant: an r × r moment of each "
        "factor's gradient in the QR frame of the other factor.",
        family="adam",
        quotient=False,
        build={"lora": _baseline(baselines.lora_rite)},
    ),
    OptimizerSpec(
        name="balora",
        label="BaLoRA",
        role="*fixes* the gauge after every step: AdamW, then each adapter moved to its "
        "balanced representative BᵀB = AAᵀ.",
        family="adam",
        quotient=False,
        build={"lora": _baseline(balora)},
    ),
    OptimizerSpec(
        name="qadam-mat",
        label="QuotientMatrixAdam",
        role="*reduces* GL(r) per adapter with r × r second moments of each factor's gradient "
        "at the dressed representative, carried by the dressing.",
        family="adam",
        quotient=True,
        build={"lora": _qadam_mat},
    ),
    OptimizerSpec(
        name="riemannion",
        label="Riemannion",
        role="*reduces* GL(r) per adapter by optimising ΔW = BA on the manifold of rank-r "
        "matrices: Muon's orthogonalised step in its tangent space, a truncated-SVD retraction.",
        family="adam",
        quotient=False,
        build={"lora": _riemannion("direction")},
    ),
    OptimizerSpec(
        name="riemannion-mom",
        label="Riemannion (momentum carried)",
        role="*reduces* GL(r) per adapter as Riemannion does, carrying Muon's momentum buffer "
        "between steps instead of the orthogonalised direction.",
        family="adam",
        quotient=False,
        build={"lora": _riemannion("momentum")},
    ),
)
