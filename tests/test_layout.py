"""The shape of the source tree: no file of ``quotopt/`` or ``manifolds/`` over 400 lines, and
every module of both packages imports on its own and in any order (no import cycle).

An import cycle shows only when one of its modules is imported *first*: importing
``quotopt`` (which pulls in most modules in one fixed order) hides it. So every module is
imported first in an interpreter where no module of either package is loaded yet: by default in
one child process that unloads both packages between imports (third-party modules such as
torch stay loaded; they take no part in a cycle of ours), and, marked slow, in a fresh
``python -c "import X"`` per module. Shuffled orders of all modules are imported too. Each check
has a control: a planted two-module cycle that the same helper must report.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("quotopt", "manifolds")
MAX_LINES = 400


def modules(root: Path = ROOT, packages=PACKAGES) -> list[str]:
    """Dotted names of every module of ``packages`` under ``root`` (packages included)."""
    names = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def test_no_source_file_over_the_line_limit():
    sizes = {
        path.relative_to(ROOT).as_posix(): len(path.read_text().splitlines())
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
    }
    assert len(sizes) > 20  # the walk found the tree
    over = {path: n for path, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"files over {MAX_LINES} lines: {over}"


# the child: for each order, unload both packages, import the order, report the first failure
_CHILD = """
import importlib, json, random, sys, traceback
names, prefixes, seeds = (json.loads(arg) for arg in sys.argv[1:4])
prefixes = tuple(prefixes)
orders = [[n] for n in names] + [random.Random(s).sample(names, len(names)) for s in seeds]
failures = []
for order in orders:
    for loaded in [m for m in sys.modules if m.split(".")[0] in prefixes]:
        del sys.modules[loaded]
    for name in order:
        try:
            importlib.import_module(name)
        except Exception as err:
            last = traceback.extract_tb(err.__traceback__)[-1]
            where = f"{last.filename.rsplit('/', 1)[-1]}:{last.lineno}"
            failures.append(dict(order=order[:order.index(name) + 1], module=name,
                                 error=f"{type(err).__name__}: {err} ({where})"))
            break
print(json.dumps(failures))
"""


def import_failures(names, root: Path = ROOT, packages=PACKAGES, seeds=(0, 1, 2)) -> list[dict]:
    """Failures of importing each of ``names`` first, then of ``len(seeds)`` shuffled orders
    of all of them (each failure: the order up to the module that failed, and the error)."""
    argv = [json.dumps(list(names)), json.dumps(list(packages)), json.dumps(list(seeds))]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, *argv],
        cwd=root, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _describe(failures: list[dict]) -> str:
    lines = [f"{f['module']} (after {f['order'][:-1][-3:]}): {f['error']}" for f in failures]
    return "\n".join(lines)


def outside_references(root: Path = ROOT, name: str = "DESIGN" + ".md") -> list[str]:
    """Tracked text files of the repository that cite ``name``, a document that is not in it."""
    files = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.split("\0")
    found = []
    for rel in filter(None, files):
        path = root / rel
        if path.suffix in (".py", ".md", ".toml", ".yml", ".sh", ".cfg") and path.is_file():
            if name in path.read_text(errors="replace"):
                found.append(rel)
    return found


def test_no_file_cites_a_document_outside_the_repository(tmp_path):
    """Docstrings, tests and docs cite docs/ pages and papers, never a design file that the
    repository does not hold. Control: a planted citation is found."""
    assert not (ROOT / ("DESIGN" + ".md")).exists()
    assert outside_references() == []
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "m.py").write_text('"""See ' + "DESIGN" + '.md section 1."""\n')
    subprocess.run(["git", "-C", str(tmp_path), "add", "m.py"], check=True)
    assert outside_references(tmp_path) == ["m.py"]


def test_every_module_imports_first_and_in_shuffled_orders():
    names = modules()
    assert {"quotopt.lab.training.loop", "quotopt.lab.plotting", "manifolds.heads"} <= set(names)
    failures = import_failures(names)
    assert not failures, _describe(failures)


def _planted_cycle(tmp_path: Path) -> Path:
    """A package ``cyc`` whose modules ``a`` and ``b`` import a name from each other."""
    package = tmp_path / "cyc"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from .b import B\n\nA = 1\n")
    (package / "b.py").write_text("from .a import A\n\nB = 2\n")
    return tmp_path


def test_a_planted_import_cycle_is_reported(tmp_path):
    """The control: the same helper on a two-module cycle reports both modules."""
    root = _planted_cycle(tmp_path)
    failures = import_failures(modules(root, ("cyc",)), root, ("cyc",), seeds=(0,))
    assert {f["module"] for f in failures} >= {"cyc.a", "cyc.b"}
    assert all("partially initialized" in f["error"] for f in failures)


def _fresh_import(name: str, root: Path = ROOT) -> str | None:
    done = subprocess.run(
        [sys.executable, "-c", f"import {name}"], cwd=root, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    if done.returncode == 0:
        return None
    lines = done.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {done.returncode}"


@pytest.mark.slow
def test_every_module_imports_in_a_fresh_interpreter(tmp_path):
    names = modules()
    with ThreadPoolExecutor(2) as pool:
        errors = dict(zip(names, pool.map(_fresh_import, names)))
    failed = {name: error for name, error in errors.items() if error}
    assert not failed, "\n".join(f"{n}: {e}" for n, e in failed.items())
    control = _planted_cycle(tmp_path)
    assert "partially initialized" in (_fresh_import("cyc.a", control) or "")


def test_plotting_selects_no_backend_and_leaves_pyplot_alone(tmp_path):
    """``quotopt.lab.plotting`` imports matplotlib only when drawing and never ``pyplot``."""
    code = (
        "import sys, quotopt.lab.plotting as qp\n"
        "assert 'matplotlib' not in sys.modules\n"
        "fig, ax = qp.new_figure()\n"
        "run = dict(summary=dict(config=dict(optim='adamw')),\n"
        "           records=[dict(step=0, val_loss=1.0), dict(step=1, val_loss=None)])\n"
        "qp.curves(ax, [run], 'val_loss', log=True)\n"
        f"qp.save_figure(fig, {str(tmp_path / 'f.png')!r})\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"


# ---- circles that never fail at import: function-level imports are edges too ---------------
def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """Module → the modules of ``packages`` it imports anywhere in its body (module level,
    functions, methods), by reading the source. ``from P import name`` counts as an edge to the
    submodule ``P.name`` when there is one, else to ``P``. A package's ``__init__`` importing its
    own submodules (re-exports) is not an edge: a facade, not a dependency."""
    paths = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            init = parts[-1] == "__init__"
            paths[".".join(parts[:-1] if init else parts)] = (path, init)

    def known(name: str) -> str | None:
        while name and name not in paths:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, (path, init) in paths.items():
        here = name if init else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {known(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in paths else known(base))
        graph[name] = {t for t in targets if t and t != name and not t.startswith(name + ".")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circle_even_through_function_level_imports():
    graph = import_graph()
    assert "quotopt.models.transformer" in graph and graph["quotopt.lab.training.loop"]
    assert circles(graph) == []


def test_a_planted_function_level_circle_is_found(tmp_path):
    """The control: ``b`` imports ``a`` inside a function — no import ever fails, the circle
    is there — and a third module outside it is not reported."""
    package = tmp_path / "cyc"
    package.mkdir()
    (package / "__init__.py").write_text("from . import a\n")
    (package / "a.py").write_text("from .b import B\n")
    (package / "b.py").write_text("def B():\n    from . import a\n    return a\n")
    (package / "c.py").write_text("from .a import B\n")
    assert circles(import_graph(tmp_path, ("cyc",))) == [["cyc.a", "cyc.b"]]
    assert import_failures(modules(tmp_path, ("cyc",)), tmp_path, ("cyc",), seeds=(0,)) == []


LABORATORY = "quotopt.lab"


def library_to_laboratory(graph: dict[str, set[str]], lab: str = LABORATORY) -> dict[str, set[str]]:
    """Library modules (outside ``lab``) → the laboratory modules they import anywhere."""
    inside = lambda name: name == lab or name.startswith(lab + ".")  # noqa: E731
    edges = {m: {t for t in targets if inside(t)} for m, targets in graph.items() if not inside(m)}
    return {m: t for m, t in edges.items() if t}


def test_no_library_module_imports_from_the_laboratory():
    graph = import_graph()
    assert "quotopt.lab.cli.main" in graph and "quotopt.lab.training.loop" in graph
    assert library_to_laboratory(graph) == {}


def test_a_planted_library_import_of_the_laboratory_is_found(tmp_path):
    """The control: a library module that imports the laboratory inside a function."""
    package = tmp_path / "pkg"
    (package / "lab").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "lab" / "__init__.py").write_text("")
    (package / "lab" / "run.py").write_text("from .. import core\n")
    (package / "core.py").write_text("def f():\n    from .lab import run\n    return run\n")
    found = library_to_laboratory(import_graph(tmp_path, ("pkg",)), "pkg.lab")
    assert found == {"pkg.core": {"pkg.lab.run"}}
