"""``quotopt bench``: run the benchmark scripts of ``benchmarks/`` in this process, one after
the other. Each defines ``main(argv)``, which prints its ratio table; the folder is imported as
a package when it is one (the scripts import ``benchmarks._timing``)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

EXPECTED = ("bench_geometry", "bench_optimizer", "bench_models")
DEFAULT_DIR = Path(__file__).resolve().parents[3] / "benchmarks"  # a source checkout's


def add_arguments(parser) -> None:
    parser.add_argument("--quick", action="store_true", help="pass --quick to every script")
    parser.add_argument("--only", help="comma-separated script names, e.g. bench_models")
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_DIR, help="folder of the scripts (default: %(default)s)"
    )


def _load(folder: Path, name: str):
    if (folder / "__init__.py").is_file():  # a package: import it as such
        sys.path.insert(0, str(folder.parent))
        try:
            return importlib.import_module(f"{folder.name}.{name}")
        finally:
            sys.path.remove(str(folder.parent))
    spec = importlib.util.spec_from_file_location(f"_quotopt_bench_{name}", folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(args) -> int:
    found = sorted(p.stem for p in args.dir.glob("bench_*.py")) if args.dir.is_dir() else []
    names = list(dict.fromkeys([*EXPECTED, *found]))
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
    argv = ["--quick"] if args.quick else []
    ran = failed = 0
    for name in names:
        if name not in found:
            print(f"quotopt bench: {args.dir / name}.py is missing; skipped", flush=True)
            continue
        print(f"== {name} {' '.join(argv)}".rstrip(), flush=True)
        try:
            _load(args.dir, name).main(list(argv))
        except SystemExit as stop:
            failed += stop.code not in (None, 0)
        except Exception as err:  # noqa: BLE001 - one broken script must not hide the others
            failed += 1
            message = " ".join(f"{type(err).__name__}: {err}".split())
            sys.stderr.write(
                f"quotopt bench: {name} failed ({message}); run it alone for the traceback\n"
            )
        ran += 1
        sys.stdout.flush()
    if not ran:
        sys.stderr.write(f"quotopt bench: no benchmark scripts found in {args.dir}\n")
    return 1 if failed or not ran else 0
