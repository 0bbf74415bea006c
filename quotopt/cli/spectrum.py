"""``quotopt spectrum``: train a tiny model without weight decay, then count the flat
directions of the Hessian of the full-batch training loss over ALL its parameters, and how
many of them the symmetries explain (the vertical tangents of every bundle group, embedded in
the flattened parameter vector)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import training
from ..dynamics import (
    dense_hessian,
    flat_directions,
    flatten,
    hessian_operator,
    lanczos_extremes,
    unflatten,
    vertical_basis,
)
from ..symmetries import group_point, symmetries

DENSE_MAX = 5000  # parameters up to which the Hessian is formed densely
NOTE = (
    "Hessian of the full-batch training loss over all trainable parameters, in float64, at the "
    "trained point. Trained without weight decay so that every orbit (not only compact ones) "
    "is a level set of the loss. At a critical point each vertical tangent is a null vector; "
    "the trained point is only near-critical (grad_norm): vertical tangents along nilpotent ξ "
    "(ξ² = 0, e.g. off-diagonal units of gl(r)) stay exactly flat, those with ξ² ≠ 0 pick up "
    "curvature of order ‖∇f‖ (vertical_rayleigh, relative to max|λ|), and a "
    "memorised cross-entropy loss has a continuum of small eigenvalues besides: "
    "flat_by_tolerance shows how the counts move with the tolerance."
)


def add_arguments(parser) -> None:
    from .train import add_common_arguments

    add_common_arguments(parser, steps=2000, size="tiny", task="modadd", threads=1)
    parser.add_argument(
        "--rel-tol",
        type=float,
        default=1e-8,
        help="an eigenvalue is flat when |λ| <= rel_tol * max|λ| (default: %(default)g, above "
        "float64 round-off; see flat_by_tolerance in the JSON for other choices)",
    )
    parser.add_argument("--json", action="store_true", help="print the JSON result on stdout")


@torch.no_grad()
def model_vertical_basis(model, groups) -> tuple[torch.Tensor, dict[str, int]]:
    """(n, Σ group_dim) vertical tangents of every bundle group of ``groups`` as columns in
    the flattened coordinates of the model's trainable parameters (``named_parameters``
    order), and each group's orbit dimension (the rank of its columns)."""
    params = [p for p in model.parameters() if p.requires_grad]
    offsets, start = {}, 0
    for p in params:
        offsets[id(p)], start = start, start + p.numel()
    columns, dims = [], {}
    for group in groups:
        bundle = group.get("bundle")
        if bundle is None:
            continue
        point, layout = group_point(group), group.get("layout")
        basis = vertical_basis(bundle, point)  # (coordinates of the point, group_dim)
        for col in basis.mT:
            zeros = [torch.zeros_like(p) for p in group["params"]]
            tangent = unflatten(col, point)
            if getattr(layout, "needs_scatter", False):
                layout.scatter(zeros, tangent)
            else:
                for view, t in zip(layout(zeros) if layout else zeros, tangent):
                    view.copy_(t)
            full = params[0].new_zeros(start)
            for p, z in zip(group["params"], zeros):
                full[offsets[id(p)] : offsets[id(p)] + p.numel()] = z.reshape(-1)
            columns.append(full)
        dims[group["name"]] = int(torch.linalg.matrix_rank(basis)) if basis.numel() else 0
    return torch.stack(columns, 1) if columns else params[0].new_zeros(start, 0), dims


def analyse(task, model, rel_tol: float) -> dict:
    """The flat-direction report of the full-batch training loss at the model's parameters."""
    model = model.double()
    groups = symmetries(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = tuple(p.detach() for p in model.parameters() if p.requires_grad)
    x, y = task.batch("train", None)

    def loss_fn(*ps):
        bound = dict(zip(names, ps))
        return task.loss(task.logits(lambda t, **kw: functional_call(model, bound, (t,), kw), x), y)

    vertical, dims = model_vertical_basis(model, groups)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernels have no double backward
        report = _report(loss_fn, params, vertical, dims, rel_tol)
    leaves = tuple(p.clone().requires_grad_() for p in params)
    loss = loss_fn(*leaves)
    grad = flatten(torch.autograd.grad(loss, leaves))
    rayleigh = torch.tensor(report["vertical_rayleigh"]).abs()
    report.update(
        orbit_dims=dims,
        grad_norm=float(grad.norm()),
        train_loss=float(loss.detach()),
        vertical_flat=int((rayleigh <= rel_tol).sum()),
        note=NOTE,
    )
    return report


def _report(loss_fn, params, vertical, dims, rel_tol) -> dict:
    n = vertical.shape[0]
    if n <= DENSE_MAX:
        report = flat_directions(
            dense_hessian(loss_fn, params, max_params=DENSE_MAX), vertical, rel_tol=rel_tol
        ).to_dict()
        report["method"] = "dense"
        report["flat_by_tolerance"] = _by_tolerance(report)
    else:  # extremes only: flat directions cannot be counted without the whole spectrum
        op = hessian_operator(loss_fn, params)
        hv = torch.stack([torch.from_numpy(op.matvec(c.numpy())) for c in vertical.mT], 1)
        top = lanczos_extremes(loss_fn, params, k=20, which="BE")
        scale = float(abs(top).max())
        rayleigh = (vertical * hv).sum(0) / (vertical * vertical).sum(0) / scale
        report = dict(
            method="lanczos",
            n_params=n,
            eigenvalues=top.tolist(),
            scale=scale,
            orbit_dim=sum(dims.values()),
            flat_total=None,
            flat_horizontal=None,
            vertical_rayleigh=rayleigh.tolist(),
            rel_tol=rel_tol,
            tolerance_rule=None,
            max_abs_vertical_rayleigh=float(rayleigh.abs().max()),
        )
    return report


def _by_tolerance(report: dict) -> dict[str, list[int]]:
    """{rel_tol: [flat_total, flat_horizontal]} over a ladder of tolerances: how robust the
    counts are (a clean symmetry gap keeps their difference at orbit_dim over decades)."""
    total = torch.tensor(report["eigenvalues"]).abs()
    horizontal = torch.tensor(report["horizontal_eigenvalues"]).abs()
    out = {}
    for exponent in range(-12, -1):
        tol = 10.0**exponent * report["scale"]
        out[f"1e{exponent}"] = [int((total <= tol).sum()), int((horizontal <= tol).sum())]
    return out


def run(args) -> int:
    from . import plots
    from .train import config_from_args, progress

    cfg = config_from_args(  # full batch: the trained loss is the analysed one
        args,
        weight_decay=0.0 if args.weight_decay is None else None,
        batch_size=0 if args.batch_size is None else None,
    )
    out = Path(args.out)
    with progress(args, cfg.steps, f"{cfg.task} {cfg.optim}") as hooks:
        training.train(cfg, out, resume=args.resume, **hooks)
    cfg = cfg.resolved()
    task = training.build_task(cfg.task, cfg.size, cfg.seed)
    model = training.build_model(task, cfg.model, cfg.size)
    model.load_state_dict(training.load_checkpoint(out / "checkpoint.pt")["model"])
    report = analyse(task, model, args.rel_tol)
    result = dict(
        task=cfg.task,
        model=cfg.model,
        size=cfg.size,
        optim=cfg.optim,
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        steps=cfg.steps,
        seed=cfg.seed,
        **report,
    )
    result = {
        k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()
    }
    training.write_json(out / "spectrum.json", result)
    plots.spectrum_plot(result, out / "spectrum.png")
    if args.json:
        sys.stdout.write(json.dumps(result) + "\n")
    else:
        keys = ("n_params", "orbit_dim", "flat_total", "flat_horizontal", "tolerance_rule")
        print(", ".join(f"{k} {result.get(k)}" for k in keys) + f"; wrote {out}")
    return 0
