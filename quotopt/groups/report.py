"""What ``quotopt.symmetries`` found, as a table a user can read (``quotopt.describe``), the rows
for what it could not find, and the warning when the result is not what a user expects."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from torch import nn

__all__ = ["Finding", "SymmetryReport", "note_unrecognised", "summarise"]


@dataclass
class Finding:
    """One row: a module part, where its group came from (``declared``, ``model``, ``detected``,
    ``frozen``), the group, its dimension, the verified change, or why there is none, and the
    candidates rejected on the way (the control beside each accepted group)."""

    path: str
    part: str
    source: str
    structure: str = ""
    group: str = ""
    bundle: str = ""
    dim: int | None = None
    change: float | None = None
    note: str = ""
    tried: tuple = ()  # candidates rejected before this one (structure: change)


def _bundle_name(bundle) -> str:
    components = getattr(bundle, "components", None)
    if components:
        return " x ".join(type(c).__name__ for c in components)
    return type(bundle).__name__


@dataclass
class SymmetryReport:
    """Every finding, and the share of trainable parameter entries in bundle groups."""

    model: str
    findings: list[Finding] = field(default_factory=list)
    covered: int = 0
    total: int = 0

    @property
    def share(self) -> float:
        return self.covered / self.total if self.total else 0.0

    def add(self, path, part, source, group=None, **kw) -> None:
        if group is not None:
            bundle = group.get("bundle")
            kw.setdefault("group", group["name"])
            if bundle is not None:
                kw.setdefault("bundle", _bundle_name(bundle))
                kw.setdefault("dim", bundle.group_dim)
        self.findings.append(Finding(path.rstrip(".") or "(model)", part, source, **kw))

    @property
    def groups(self) -> list[Finding]:
        return [f for f in self.findings if f.bundle]

    def __str__(self) -> str:
        head = (
            "module",
            "part",
            "source",
            "group found",
            "dim G",
            "change",
            "structure / why none",
        )
        rows = [head]
        for f in self.findings:
            found = f"{f.bundle} ({f.group})" if f.bundle else ("-" if not f.group else f.group)
            change = "-" if f.change is None else f"{f.change:.0e}"
            dim = "-" if f.dim is None else str(f.dim)
            rows.append((f.path, f.part, f.source, found, dim, change, f.note or f.structure))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
        lines = [
            f"symmetries of {self.model}: {len(self.groups)} symmetric part(s), "
            f"{100 * self.share:.1f}% of {self.total} trainable entries covered"
        ]
        for row in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
        return "\n".join(lines)


def _looks_like(module: nn.Module) -> str | None:
    """``"attention"`` or ``"mlp"`` where a module's class name says so, else None."""
    name = type(module).__name__
    if "Attention" in name:
        return "attention"
    if name.endswith(("MLP", "FeedForward")):
        return "mlp"
    return None


def note_unrecognised(model, slots, skip_paths, frozen_paths, table: SymmetryReport) -> None:
    """Rows for attention- or MLP-looking modules that no slot of their kind covers (a layer
    whose MLP was found still reports its attention), and for LayerNorm's O(d)."""
    kinds = {"attention": ("attention", "lora"), "mlp": ("mlp", "experts", "lora")}
    anywhere = [*skip_paths, *frozen_paths]

    def related(path, covered):
        return any(
            c == "" or path == c or path.startswith(c + ".") or c.startswith(path + ".")
            for c in covered
        )

    for path, module in model.named_modules():
        kind = _looks_like(module)
        if kind is None:
            continue
        covered = anywhere + [s.path.rstrip(".") for s in slots if s.kind in kinds[kind]]
        if not related(path, covered):
            name = type(module).__name__
            table.add(path, "-", "detected", note=f"unrecognised layout ({name}): declare it")
    norms = {type(m).__name__ for m in model.modules() if isinstance(m, nn.LayerNorm)}
    if norms and not skip_paths:
        table.add(
            "",
            "residual",
            "detected",
            note=f"O(d) not reduced: {', '.join(sorted(norms))} centring breaks it",
        )


def summarise(model, groups, table: SymmetryReport, unverified=(), why: str = "") -> None:
    """Fill in the coverage, and warn where candidates went unverified for want of a working
    example forward (``unverified`` paths, ``why``) or where nothing was found."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_bundles = {id(p) for g in groups if g.get("bundle") is not None for p in g["params"]}
    table.total = sum(p.numel() for p in trainable)
    table.covered = sum(p.numel() for p in trainable if id(p) in in_bundles)
    model_name = type(model).__name__
    if unverified:
        paths = sorted(set(unverified))
        where = ", ".join(paths[:4]) + (", …" if len(paths) > 4 else "")
        found = (
            f"found no symmetry in {model_name}"
            if not in_bundles
            else f"covered {100 * table.share:.1f}% of {model_name}"
        )
        warnings.warn(
            f"quotopt.symmetries {found}: the candidates detected in {len(paths)} module(s) "
            f"({where}) were not verified because {why}. Pass example_inputs=(args, kwargs) "
            "that run one forward of the model; quotopt.describe(model) says what was tried",
            stacklevel=3,
        )
        return
    if not in_bundles:
        looks = sorted({type(m).__name__ for m in model.modules() if _looks_like(m)})
        hint = f" (modules that look like attention or MLPs: {', '.join(looks)})" if looks else ""
        warnings.warn(
            f"quotopt.symmetries found no symmetry in {model_name}{hint}: every "
            "parameter is in the plain group and QuotientAdam is AdamW. Declare the bundles "
            "with declared=[...] (docs/guides/wrap-your-model.md); quotopt.describe(model) "
            "says what was tried",
            stacklevel=3,
        )
