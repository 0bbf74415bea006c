"""What ``quotopt.symmetries`` found, as a table a user can read (``quotopt.describe``)."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Finding", "SymmetryReport"]


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
