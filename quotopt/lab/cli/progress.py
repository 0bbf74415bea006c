"""A progress bar for commands that train one run after another (``finetune``, ``quantise``)."""

from __future__ import annotations

import sys
from collections.abc import Callable


class RunBars:
    """One tqdm bar per run on stderr (off when not a TTY or ``--quiet``); without a bar, one
    line per finished run on stdout unless ``--quiet``. ``describe(result)`` is the text a
    finished run shows."""

    def __init__(self, args, describe: Callable[[dict], str]):
        from tqdm import tqdm

        self.quiet, self.lines = args.quiet or not sys.stderr.isatty(), not args.quiet
        self.bar = tqdm(disable=self.quiet, file=sys.stderr, dynamic_ncols=True, unit="step")
        self.label, self.describe = "", describe

    def start(self, label: str, steps: int):
        """Reset the bar for the run ``label`` of ``steps`` steps; returns its step callback."""
        self.label = label
        self.bar.reset(total=steps)
        self.bar.set_description(label)
        return lambda step: self.bar.update(step - self.bar.n)

    def finish(self, result: dict) -> None:
        text = self.describe(result)
        self.bar.set_postfix_str(text)
        if self.quiet and self.lines:
            print(f"{self.label}: {text}", flush=True)
