"""``quotopt`` console command: argument parsing and error reporting; the work is elsewhere."""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from .. import __version__
from . import bench, compare, finetune, spectrum, study, train

COMMANDS = {
    "train": (train, "train one model, logging metrics and resumable checkpoints"),
    "compare": (compare, "every optimiser x seed on one task: report.md, plots, metrics.json"),
    "spectrum": (spectrum, "Hessian flat directions of a tiny trained model vs its symmetries"),
    "study": (study, "the benchmark study: tune, compare, write docs/results.md"),
    "bench": (bench, "run the benchmark scripts in benchmarks/ and print their tables"),
    "finetune": (finetune, "LoRA fine-tuning study: ranks x optimisers, tuned, then seeds"),
}


class Parser(argparse.ArgumentParser):
    """Reports a usage error as one line, ``quotopt: error: ...``, and exits with 2."""

    def error(self, message):
        sys.stderr.write(f"quotopt: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser() -> Parser:
    parser = Parser(
        prog="quotopt",
        description="Optimisation on quotient manifolds of neural-network parameter symmetries.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        module.add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status:
    0, 1 for bad input, failed work or a bug (one line on stderr; set ``QUOTOPT_DEBUG=1`` for
    the traceback), 2 for usage errors, 130 when interrupted (after saving a resumable
    checkpoint). Warnings are one line each on stderr."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:  # --help, --version or a usage error (already reported)
        return stop.code if isinstance(stop.code, int) else 2
    module = COMMANDS[args.command][0]
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
            return module.run(args)
    except KeyboardInterrupt as stop:
        where = getattr(stop, "checkpoint", None)
        note = f"; resumable checkpoint {where} (add --resume)" if where else ""
        sys.stderr.write(f"quotopt: interrupted at step {getattr(stop, 'step', '?')}{note}\n")
        return 130
    except (ValueError, OSError, ImportError, RuntimeError) as err:
        if os.environ.get("QUOTOPT_DEBUG"):  # the full traceback, for bug reports
            raise
        message = " ".join(str(err).split()) or type(err).__name__
        sys.stderr.write(f"quotopt: error: {message}\n")
        return 1
    except Exception as err:  # a bug: still one line, the traceback on request
        if os.environ.get("QUOTOPT_DEBUG"):
            raise
        message = " ".join(str(err).split())
        sys.stderr.write(
            f"quotopt: internal error: {type(err).__name__}: {message} (set QUOTOPT_DEBUG=1 "
            "for the traceback and report it)\n"
        )
        return 1


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings during a command as ``quotopt: warning: ...`` lines on stderr."""
    text = " ".join(str(message).split())
    (file or sys.stderr).write(f"quotopt: warning: {category.__name__}: {text}\n")


if __name__ == "__main__":
    sys.exit(main())
