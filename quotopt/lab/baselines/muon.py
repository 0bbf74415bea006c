r"""Muon as a baseline: ``torch.optim.Muon`` on the hidden matrices, AdamW on the rest.

Muon (Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"; Liu et al.
2025, "Muon is Scalable for LLM Training", arXiv:2502.16982) orthogonalises the momentum of each
2-D weight of the hidden layers; its authors keep embeddings, norms, biases and the read-out on
AdamW. ``MuonWithAdamW`` is that pair (and, for ``quotient_muon_adamw``, ``QuotientMuon`` on
the symmetry groups beside them) behind one optimiser interface: ``step``, ``zero_grad``,
``state_dict``, ``load_state_dict``, ``param_groups``.

**Which matrices, in which layout.** ``quotopt.models.Transformer`` (and the relational model)
stores its hidden maps for ``X @ W``: heads as (H, d, r) (``wq``, ``wk``, ``wv``: read the
stream) and (H, r, d) (``wo``: write it), the MLP as (d, d_mlp) and (d_mlp, d). Muon sees each as
the weight a torch layer would hold, (out, in): the **whole projection** — W_Q as (H·r, d), W_O
as (d, H·r), W_in as (d_mlp, d). Whole projections, not heads, because that is what Muon is on
every standard transformer (``nn.Linear(d, H·r)`` per projection, as in modded-nanogpt and
Moonshot's runs), so the baseline is the one the literature reports; per-head orthogonalisation
would be another optimiser. The (out, in) orientation matters only for torch's learning-rate
adjustment (Newton–Schulz commutes with transposition). ``torch.optim.Muon`` only takes 2-D
leaf tensors, so each hidden tensor has a 2-D proxy in that layout: before each step the
proxy receives the parameter and its gradient, after it the parameter receives the proxy —
one copy of the hidden weights per step, and the step is torch's own. Hidden matrices are the
≥ 2-D parameters of ``model.blocks``; a model without ``blocks`` gets Muon on the weights of
its ``nn.Linear`` modules (already (out, in)) except the last one (the read-out).

**One (lr, wd) pair.** The registry tunes one learning rate and weight decay per optimiser, so
Muon uses ``adjust_lr_fn="match_rms_adamw"``: its update is scaled by 0.2·√max(out, in), the RMS
of an AdamW update, so that AdamW's lr and wd carry over to it (Liu et al. 2025, §2.2).
"""

from __future__ import annotations

import torch
from torch import nn

from ...groups import group_point, symmetries
from ...models.transformer import MODEL_AXES
from ...optim import QuotientAdam, QuotientMuon
from ...optim.newton_schulz import factored_parts

__all__ = ["MuonWithAdamW", "hidden_matrices", "muon_adamw", "quotient_muon_adamw"]


class _Proxy:
    """A parameter seen as the (out, in) matrix of the linear map it applies."""

    def __init__(self, param: nn.Parameter, kind: str):
        self.param, self.kind = param, kind  # "row" (X @ W), "reads" (H, d, r), "writes" (H, r, d)
        self.matrix = nn.Parameter(self.to_matrix(param.detach()).clone())

    def to_matrix(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "row":
            return t.T
        h, a, b = t.shape
        if self.kind == "reads":  # X @ W[h]: output unit (h, j), input i
            return t.transpose(1, 2).reshape(h * b, a)
        return t.reshape(h * a, b).T  # writes: input unit (h, j), output o

    def from_matrix(self, m: torch.Tensor) -> torch.Tensor:
        if self.kind == "row":
            return m.T
        h, a, b = self.param.shape
        if self.kind == "reads":
            return m.reshape(h, b, a).transpose(1, 2)
        return m.T.reshape(h, a, b)

    def load(self) -> None:
        self.matrix.detach().copy_(self.to_matrix(self.param.detach()))
        grad = self.param.grad
        self.matrix.grad = None if grad is None else self.to_matrix(grad).contiguous()

    def store(self) -> None:
        self.param.detach().copy_(self.from_matrix(self.matrix.detach()))


def hidden_matrices(model: nn.Module) -> list[tuple[str, nn.Parameter, str | None]]:
    """(name, parameter, layout) of the matrices Muon takes (module docstring); layout None:
    already (out, in), the parameter itself is handed to Muon."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Module):
        out = []
        for name, p in blocks.named_parameters(prefix="blocks"):
            if p.requires_grad and p.dim() in (2, 3):
                axis = MODEL_AXES.get(name.rsplit(".", 1)[-1], 1)
                kind = "row" if p.dim() == 2 else ("writes" if axis == 2 else "reads")
                out.append((name, p, kind))
        return out
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [(f"{n}.weight", m.weight, None) for n, m in linears[:-1] if m.weight.requires_grad]


class MuonWithAdamW(torch.optim.Optimizer):
    """Several optimisers over disjoint parameters stepped as one: ``torch.optim.Muon`` on the
    proxies of the hidden matrices, AdamW on the rest, and optionally a ``QuotientMuon``.

    A ``torch.optim.Optimizer`` whose ``param_groups`` are the inner optimisers' own group
    dicts (so LR schedulers and per-group changes reach them); its state lives in the inner
    optimisers (``optimizers``), and ``state_dict`` holds one entry per inner optimiser."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], proxies: list[_Proxy]):
        self.optimizers, self._proxies = dict(optimizers), list(proxies)
        super().__init__([g for opt in self.optimizers.values() for g in opt.param_groups], {})

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)
        for proxy in self._proxies:  # the model's own tensors, which no optimiser holds
            if set_to_none:
                proxy.param.grad = None
            elif proxy.param.grad is not None:
                proxy.param.grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for proxy in self._proxies:
            proxy.load()
        for opt in self.optimizers.values():
            opt.step()
        for proxy in self._proxies:
            proxy.store()
        return loss

    def state_dict(self) -> dict:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        if set(state_dict) != set(self.optimizers):
            raise ValueError(
                f"state_dict holds optimisers {sorted(state_dict)}, this one has "
                f"{sorted(self.optimizers)}"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state_dict[name])

    def rank_deficient_heads(self) -> dict[str, list[int]]:
        """The quotient part's heads that lost rank (``QuotientOptimizer``); {} without one."""
        out = {}
        for opt in self.optimizers.values():
            if hasattr(opt, "rank_deficient_heads"):
                out.update(opt.rank_deficient_heads())
        return out

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={type(v).__name__}" for k, v in self.optimizers.items())
        return f"MuonWithAdamW({parts})"


def _split(model: nn.Module, exclude=()):
    skip = {id(p) for p in exclude}
    hidden = [(n, p, k) for n, p, k in hidden_matrices(model) if id(p) not in skip]
    proxies = [_Proxy(p, k) for _, p, k in hidden if k is not None]
    targets = [proxy.matrix for proxy in proxies] + [p for _, p, k in hidden if k is None]
    taken = skip | {id(p) for _, p, _ in hidden}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
    return proxies, targets, rest


def muon_adamw(model: nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.999), **muon):
    """The Muon baseline (module docstring): ``torch.optim.Muon`` (momentum 0.95, Nesterov,
    ``adjust_lr_fn="match_rms_adamw"`` unless ``muon`` says otherwise) on the hidden matrices,
    ``torch.optim.AdamW(lr, betas, weight_decay)`` on every other parameter."""
    proxies, targets, rest = _split(model)
    muon = dict(dict(adjust_lr_fn="match_rms_adamw"), **muon)
    optimizers = {"muon": torch.optim.Muon(targets, lr=lr, weight_decay=weight_decay, **muon)}
    if rest:
        optimizers["adamw"] = torch.optim.AdamW(rest, lr, betas, weight_decay=weight_decay)
    return MuonWithAdamW(optimizers, proxies)


def _has_factors(group: dict) -> bool:
    """Whether QuotientMuon can take the group: every part of its bundle has two factors
    per head (a product of such bundles, e.g. fused q/k/v, included)."""
    try:
        factored_parts(group["bundle"], group_point(group))
    except NotImplementedError:
        return False
    return True


def quotient_muon_adamw(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas=(0.9, 0.999),
    *,
    metric: str = "euclidean",
    scope: str = "tensor",
    geometry: str = "exact",
    groups: list[dict] | None = None,
):
    """QuotientMuon on the model's factored symmetry groups (``quotopt.symmetries``; scope
    ``"tensor"``: whole projections, like the Muon baseline, and the whole MLP matrices of
    rescaled ReLU units), the Muon baseline on the hidden matrices no symmetry covers, AdamW on
    the rest — so the two differ only where the geometry acts. Symmetry groups without two
    factors (the relational model's O(d_gauge) on its embedding) go to ``QuotientAdam`` with
    the rest, whose plain groups are AdamW exactly. ``geometry``: the head pairs' route
    (``quotopt.symmetries``); ``groups``: ``symmetries(model, metric=metric,
    geometry=geometry)`` where the caller holds them already."""
    found = groups if groups is not None else symmetries(model, metric=metric, geometry=geometry)
    groups = [g for g in found if g.get("bundle") is not None]
    frozen = [g for g in found if g.get("bundle") is None and g.get("frozen")]  # key biases
    factored = [g for g in groups if _has_factors(g)]
    others = [g for g in groups if not _has_factors(g)] + frozen
    covered = [p for g in groups + frozen for p in g["params"]]
    proxies, targets, rest = _split(model, exclude=covered)
    optimizers = {}
    if factored:
        optimizers["qmuon"] = QuotientMuon(
            factored, lr=lr, weight_decay=weight_decay, scope=scope, adjust_lr_fn="match_rms_adamw"
        )
    if targets:
        optimizers["muon"] = torch.optim.Muon(
            targets, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw"
        )
    if others:
        plain = [{"params": rest, "name": "plain"}] if rest else []
        optimizers["adamw"] = QuotientAdam(others + plain, lr, betas, weight_decay=weight_decay)
    elif rest:
        optimizers["adamw"] = torch.optim.AdamW(rest, lr, betas, weight_decay=weight_decay)
    return MuonWithAdamW(optimizers, proxies)
