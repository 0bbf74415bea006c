r"""Flat directions counted at a refined critical point of a model that learns its task.

``count_setting(name)`` trains the model of one of ``SETTINGS`` full batch in float64, checks
its validation metric, refines the trained point to a true critical point of

    F(θ) = L(θ) + (λ/2)‖θ‖²

(``refine.refine_critical_point``: Newton on the complement of the level orbit directions)
and counts the Hessian's flat directions there against each reduction
(``refine.critical_point_counts``).
Which orbits are level sets of F (``model_flat``): with λ > 0 only the compact subgroup's — O(d),
O(k), O(D), O(r) per head pair — so ``expected_flat`` = ``compact_orbit_dim``; with λ = 0 at a
critical point every orbit, ``expected_flat`` = ``orbit_dim``. Cross-entropy at λ = 0 has no
finite critical point (the logits grow without bound), so the λ = 0 setting is a regression.

The settings, and why the modadd ones do not reach a critical point: ``critical_settings``.
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ...dynamics.hessian import lanczos_extremes
from ...dynamics.model_flat import DENSE_MAX
from ...dynamics.refine import (
    critical_point_counts,
    model_objective,
    model_orbit_basis,
    orthonormal_basis,
    refine_critical_point,
)
from ...dynamics.refine_krylov import hessian_residuals, refine_critical_point_krylov
from ...groups import joint_groups, symmetries
from .critical_settings import SETTINGS
from .teacher import TeacherRegression, balance_teacher

__all__ = ["SETTINGS", "count_setting", "TeacherRegression"]


def _model(setting: dict, vocab: int, seq_len: int) -> nn.Module:
    from ...models import RelationalTransformer, Transformer

    if setting["model"] == "relational":
        keys = ("n_channels", "d_gauge", "n_heads", "d_head", "d_mlp_channels")
        kw = {k: setting[k] for k in keys}
        model = RelationalTransformer(vocab, n_layers=1, max_len=seq_len, lean_mlp=False, **kw)
    else:
        kw = dict(d_mlp=setting["d_mlp"], tie_embeddings=setting.get("tie_embeddings", False))
        model = Transformer(vocab, setting["d_model"], 1, setting["n_heads"], seq_len, **kw)
    return model.double()


def _teacher(setting: dict, vocab: int, seq_len: int) -> nn.Module:
    """A random teacher (entries N(0, teacher_std²)); with λ > 0 moved to its balanced point
    by the setting's widest reduction and the model's undeclared rescalings
    (``teacher.balance_teacher``), so that ``teacher_targets`` makes it a critical point of F."""
    teacher = _model(setting, vocab, seq_len)
    with torch.no_grad():
        for p in teacher.parameters():
            p.normal_(0.0, setting["teacher_std"])
    if setting["weight_decay"]:
        widest = _widest(_reduction(teacher, r) for r in setting["reductions"])
        balance_teacher(teacher, widest)
    return teacher


def _build(setting: dict, seed: int):
    from ..tasks import get_task

    torch.manual_seed(seed)
    if setting["task"] == "modadd":
        task = get_task("modadd", seed, p=setting["p"], frac_train=setting["frac_train"])
        vocab, seq_len = setting["p"] + 1, 3
    else:
        vocab, seq_len = setting["vocab"], setting["seq_len"]
    model = _model(setting, vocab, seq_len)
    if setting["task"] == "regression":
        teacher = _teacher(setting, vocab, seq_len)
        task = TeacherRegression(
            teacher,
            vocab,
            seq_len,
            setting["n_train"],
            setting["n_val"],
            seed + 1,
            weight_decay=setting["weight_decay"],
        )
        noise = setting.get("start_noise")
        if noise is not None:  # start at the teacher's point plus noise: F = 0 lies nearby
            gen = torch.Generator().manual_seed(seed + 2)
            with torch.no_grad():
                for p, t in zip(model.parameters(), teacher.parameters()):
                    p.copy_(t + noise * torch.randn(t.shape, generator=gen, dtype=t.dtype))
    return task, model


def _objective(task, model, weight_decay):
    x, y = task.batch("train", None)
    return model_objective(
        model, lambda forward: task.loss(task.logits(forward, x), y), weight_decay
    )


def _train(task, model, setting) -> dict:
    """Full-batch Adam with coupled L2 decay (its fixed points are F's critical points) and a
    cosine schedule to zero, then L-BFGS (strong Wolfe) towards the critical point nearby, so
    that Newton starts close; returns the wall time and ‖∇F‖ after each stage."""
    params = [p for p in model.parameters() if p.requires_grad]
    objective = _objective(task, model, setting["weight_decay"])
    adam = torch.optim.Adam(params, lr=setting["lr"], betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(adam, setting["steps"])
    start = time.perf_counter()
    if not setting["steps"]:  # nothing to train: the start is the trained point
        objective(*params).backward()
        grad = float(torch.cat([p.grad.reshape(-1) for p in params]).norm())
        return {"train_seconds": 0.0, "adam_grad_norm": grad, "grad_norm": grad}
    for _ in range(setting["steps"]):
        adam.zero_grad(set_to_none=True)
        objective(*params).backward()
        adam.step()
        schedule.step()
    adam.zero_grad(set_to_none=True)
    objective(*params).backward()
    adam_grad = float(torch.cat([p.grad.reshape(-1) for p in params]).norm())
    lbfgs = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=setting.get("lbfgs_iterations", 2000),
        history_size=50,
        tolerance_grad=1e-12,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure():
        lbfgs.zero_grad(set_to_none=True)
        value = objective(*params)
        value.backward()
        return value

    lbfgs.step(closure)
    closure()
    grad = float(torch.cat([p.grad.reshape(-1) for p in params]).norm())
    seconds = time.perf_counter() - start
    return {"train_seconds": seconds, "adam_grad_norm": adam_grad, "grad_norm": grad}


def _reduction(model, name: str) -> list[dict]:
    groups = {
        "heads": lambda: symmetries(model, residual=False),
        "joint": lambda: joint_groups(model),
        "declared": lambda: symmetries(model),
        "no-channels": lambda: model.symmetry_groups(channels=False),
    }
    if name not in groups:
        raise ValueError(f"reduction must be one of {sorted(groups)}, got {name!r}")
    return [g for g in groups[name]() if g.get("bundle") is not None]


def _widest(reductions) -> list[dict]:
    """The reduction (a list of bundle groups) whose groups have the largest total dimension."""
    return max(reductions, key=lambda groups: sum(g["bundle"].group_dim for g in groups))


def _rank(basis: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(basis)) if basis.shape[1] else 0


def _metric(task, model) -> dict[str, float]:
    name = "r2" if task.kind == "regression" else "accuracy"
    out = {f"val_{name}": task.evaluate(model, "val")[name]}
    out[f"train_{name}"] = task.evaluate(model, "train")[name]
    return out


def count_setting(
    name_or_setting,
    *,
    seed: int = 0,
    rel_tol: float = 1e-8,
    refine_steps: int = 30,
    dense_max: int | None = None,
    **overrides,
) -> dict:
    """Train, refine and count for one setting (a ``SETTINGS`` name or a dict like them, with
    ``overrides`` applied); a JSON-ready dict. See the module docstring.

    Fields: ``setting``, ``n_params``, ``val_<metric>``/``train_<metric>`` at the trained and
    (``refined``) at the counted point, ``trained`` (‖∇F‖, seconds), ``refine`` (‖∇F‖ history,
    ``grad_rel`` = ‖∇F‖/(max|λ(H)|·‖θ‖), converged), ``level`` ("compact" for λ > 0, else
    "all") and per reduction ``orbit_dim``, ``compact_orbit_dim``, ``expected_flat``,
    ``flat_total``, ``flat_horizontal``, ``tolerance_rule``, ``flat_by_tolerance``, ``gap``.
    ``refine_steps``: most Newton steps (0 counts at the trained point, a control).

    Above ``dense_max`` parameters (default ``model_flat.DENSE_MAX``) the refinement is
    matrix-free (``refine_krylov``, ``refine["route"]`` "krylov") and each reduction reports,
    instead of counts (None), ``max_level_residual``: the largest ‖Hv‖/(max|λ|·‖v‖) over an
    orthonormal basis of its level directions (``model_flat`` says why counts are not claimed).
    """
    setting = dict(SETTINGS[name_or_setting]) if isinstance(name_or_setting, str) else {}
    setting.update({} if isinstance(name_or_setting, str) else dict(name_or_setting))
    setting.update(overrides)
    setting.setdefault("name", name_or_setting if isinstance(name_or_setting, str) else "custom")
    task, model = _build(setting, seed)
    trained = _train(task, model, setting)
    before = _metric(task, model)
    decay = setting["weight_decay"]
    compact = decay > 0
    reductions = {r: _reduction(model, r) for r in setting["reductions"]}
    widest = _widest(reductions.values())
    objective = _objective(task, model, decay)
    params = tuple(p.detach() for p in model.parameters() if p.requires_grad)
    level = lambda ps: model_orbit_basis(model, widest, ps, compact=compact)  # noqa: E731
    start = time.perf_counter()
    steps = setting.get("refine_steps", refine_steps)
    n = sum(p.numel() for p in params)
    dense = n <= (DENSE_MAX if dense_max is None else dense_max)
    if dense:
        refined = refine_critical_point(objective, params, level, max_steps=steps, max_params=n)
    else:
        refined = refine_critical_point_krylov(objective, params, level, max_steps=steps)
    with torch.no_grad():
        for p, value in zip([p for p in model.parameters() if p.requires_grad], refined.params):
            p.copy_(value)
    result = dict(
        setting=setting,
        seed=seed,
        n_params=n,
        trained=dict(trained, **before),
        refine=dict(
            refined.summary(),
            seconds=time.perf_counter() - start,
            route="dense" if dense else "krylov",
        ),
        level="compact" if compact else "all",
        **_metric(task, model),
    )
    counts = {}
    if not dense:  # max|λ(H)| at the refined point, shared by every reduction's residuals
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels: no double backward
            top = lanczos_extremes(objective, refined.params, k=1, which="LM", tol=1e-8)
        scale = float(abs(top).max())
    for name, groups in reductions.items():
        full = model_orbit_basis(model, groups, refined.params)
        small = model_orbit_basis(model, groups, refined.params, compact=True)
        chosen = small if compact else full
        if dense:
            c = critical_point_counts(
                objective, refined.params, chosen, rel_tol=rel_tol, hessian=refined.hessian
            )
        else:
            c = _uncounted(objective, refined.params, chosen, rel_tol, scale)
        counts[name] = dict(orbit_dim=_rank(full), compact_orbit_dim=_rank(small), **c)
    result["counts"] = counts
    return _finite(result)


def _uncounted(objective, params, level, rel_tol, scale) -> dict:
    """The matrix-free report of one reduction: the fields of ``critical_point_counts`` with
    the counts None, and the level directions' largest Hessian residual relative to
    ``scale`` (max|λ(H)|)."""
    basis = orthonormal_basis(level, level.shape[0], params[0])
    residual = hessian_residuals(objective, params, basis, scale)["residual"]

    return dict(
        n_params=level.shape[0],
        expected_flat=basis.shape[1],
        flat_total=None,
        flat_horizontal=None,
        tolerance_rule=None,
        rel_tol=rel_tol,
        scale=scale,
        flat_by_tolerance={},
        by_gap=None,
        gap=None,
        max_level_residual=float(residual.max()) if residual.numel() else 0.0,
    )


def _finite(value):
    """JSON-ready: non-finite floats as None, tuples as lists."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
