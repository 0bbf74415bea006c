"""``quotopt`` console command: argument parsing and error reporting; the work is elsewhere.

Signals: Ctrl-C at any time is one line and exit status 130 (during a run, after saving a
resumable checkpoint); SIGTERM and SIGHUP stop a command the same way (exit status 128 + the
signal's number) and are passed on to its worker processes as Ctrl-C."""

from __future__ import annotations

import os
import signal
import sys

from ..._startup import handle_interrupts_while_starting, is_command

# first, before the imports below (torch alone takes seconds): the command's Ctrl-C handling
if __name__ == "__main__" or is_command():
    handle_interrupts_while_starting()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import multiprocessing  # noqa: E402
import shutil  # noqa: E402
import threading  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

from ... import __version__  # noqa: E402

#: command -> (module of this package with ``add_arguments`` and ``run``, one-line help)
COMMANDS = {
    "train": ("train", "train one model, logging metrics and resumable checkpoints"),
    "compare": ("compare", "every optimiser x seed on one task: report.md, plots, metrics.json"),
    "spectrum": ("spectrum", "Hessian flat directions of a tiny trained model vs its symmetries"),
    "study": ("study", "the benchmark study: tune, compare, write docs/results.md"),
    "bench": ("bench", "run the benchmark scripts in benchmarks/ and print their tables"),
    "finetune": ("finetune", "LoRA fine-tuning study: ranks x optimisers, tuned, then seeds"),
    "quantise": ("quantise", "the gauge in which a pretrained LLaMA quantises best, vs baselines"),
}


def command_module(name: str):
    """The module behind the command ``name`` (imported on first use)."""
    return importlib.import_module(f".{COMMANDS[name][0]}", __package__)


class Parser(argparse.ArgumentParser):
    """Reports a usage error as one line, ``quotopt: error: ...``, and exits with 2."""

    def error(self, message):
        sys.stderr.write(f"quotopt: error: {message} (see '{self.prog} --help')\n")
        raise SystemExit(2)


def build_parser(command: str | None = None) -> Parser:
    """The parser of every command, or with ``command``: of that one alone (the others are
    listed, their modules not imported)."""
    parser = Parser(
        prog="quotopt",
        description="Optimisation on quotient manifolds of neural-network parameter symmetries.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        options = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            command_module(name).add_arguments(options)
    return parser


def main(argv=None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status:
    0, 1 for bad input, failed work or a bug (one line on stderr; set ``QUOTOPT_DEBUG=1`` for
    the traceback), 2 for usage errors, 130 when interrupted and 128 + the signal's number when
    terminated (after saving a resumable checkpoint). Warnings are one line each on stderr. A
    command that fails removes the output directory it created, unless that holds a finished
    or resumable run."""
    received: list[int] = []
    with _signals(received):
        created = None
        try:
            try:
                words = sys.argv[1:] if argv is None else list(argv)
                named = next((w for w in words if w in COMMANDS), None)
                args = build_parser(named).parse_args(words)
            except SystemExit as stop:  # --help, --version or a usage error (already reported)
                return stop.code if isinstance(stop.code, int) else 2
            module = command_module(args.command)
            created = _first_missing(getattr(args, "out", None))
            with warnings.catch_warnings():
                warnings.showwarning = _one_line_warning
                return module.run(args)
        except KeyboardInterrupt as stop:
            return _report_interrupt(stop, received)
        except Exception as err:
            _remove_created(created)
            return _report_error(err)


def _report_interrupt(stop: KeyboardInterrupt, received: list[int]) -> int:
    where = getattr(stop, "checkpoint", None)
    note = f"; resumable checkpoint {where} (add --resume)" if where else ""
    step = getattr(stop, "step", None)
    at = "" if step is None else f" at step {step}"
    if received:
        name = signal.Signals(received[0]).name
        sys.stderr.write(f"quotopt: terminated by {name}{at}{note}\n")
        return 128 + received[0]
    sys.stderr.write(f"quotopt: interrupted{at}{note}\n")
    return 130


def _report_error(err: Exception) -> int:
    if os.environ.get("QUOTOPT_DEBUG"):  # the full traceback, for bug reports
        raise err
    message = " ".join(str(err).split())
    if isinstance(err, ValueError | OSError | ImportError | RuntimeError):
        sys.stderr.write(f"quotopt: error: {message or type(err).__name__}\n")
    else:  # a bug: still one line, the traceback on request
        sys.stderr.write(
            f"quotopt: internal error: {type(err).__name__}: {message} (set QUOTOPT_DEBUG=1 "
            "for the traceback and report it)\n"
        )
    return 1


@contextlib.contextmanager
def _signals(received: list[int]):
    """Within the block Ctrl-C raises ``KeyboardInterrupt`` (the commands save and stop), and
    SIGTERM / SIGHUP are appended to ``received``, sent on to the worker processes as Ctrl-C
    and raised here as Ctrl-C too. Outside the main thread nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        received.append(signum)
        for child in multiprocessing.active_children():  # the study's workers save and stop
            with contextlib.suppress(OSError):
                os.kill(child.pid, signal.SIGINT)
        signal.raise_signal(signal.SIGINT)

    names = ["SIGINT", "SIGTERM", "SIGHUP"]
    numbers = [getattr(signal, n) for n in names if hasattr(signal, n)]
    handlers = [signal.default_int_handler] + [terminate] * (len(numbers) - 1)
    previous = [signal.signal(n, h) for n, h in zip(numbers, handlers)]
    try:
        yield
    finally:
        for number, handler in zip(numbers, previous):
            signal.signal(number, handler)


def _first_missing(out) -> Path | None:
    """The outermost directory of the path ``out`` that does not exist yet (None if all do)."""
    if out is None:
        return None
    path, missing = Path(out).absolute(), None
    while not path.exists() and path != path.parent:
        path, missing = path.parent, path
    return missing


def _remove_created(created: Path | None) -> None:
    """Remove ``created`` (made by a command that then failed) unless it holds a finished or
    resumable run."""
    if created is None or not created.is_dir():
        return
    if any(p.name in ("summary.json", "checkpoint.pt") for p in created.rglob("*")):
        return
    shutil.rmtree(created, ignore_errors=True)


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings during a command as ``quotopt: warning: ...`` lines on stderr."""
    text = " ".join(str(message).split())
    (file or sys.stderr).write(f"quotopt: warning: {category.__name__}: {text}\n")


if __name__ == "__main__":
    sys.exit(main())
