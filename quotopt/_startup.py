"""Ctrl-C while the ``quotopt`` command starts: one line and exit status 130, no traceback.

Installed before anything heavy is imported — by the package itself when the process is the
``quotopt`` console command (importing the package loads torch, which takes seconds), and by
``quotopt.lab.cli.main`` when run as a module. Nothing here imports more than the standard library.
"""

from __future__ import annotations

import os
import signal
import sys

__all__ = ["is_command", "handle_interrupts_while_starting"]


def is_command() -> bool:
    """Whether this process is the ``quotopt`` console command."""
    return os.path.basename(sys.argv[0] if sys.argv else "") in ("quotopt", "quotopt.exe")


def _interrupted_while_starting(signum, frame) -> None:
    """Nothing to save yet. A worker process still starting (it imports the package too)
    ends silently: its parent reports."""
    if "--multiprocessing-fork" not in getattr(sys, "orig_argv", ()):
        sys.stderr.write("quotopt: interrupted\n")
        sys.stderr.flush()
    os._exit(130)


def handle_interrupts_while_starting() -> None:
    """Make Ctrl-C end the starting command with one line (the command replaces this handler
    with its own once it runs)."""
    signal.signal(signal.SIGINT, _interrupted_while_starting)
