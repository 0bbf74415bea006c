"""Byte-level text for the fine-tuning tasks: the plays (pretraining), and two fine-tuning
domains — the Python standard library's own source (``stdlib``) and English technical prose,
the language reference's topics that ship with Python as ``pydoc_data.topics`` (``prose``).

Pretraining text: the cleaned Shakespeare of ``quotopt.lab.tasks.chars`` (``corpus()``), ASCII, as
bytes; its first 90% train, the rest validation, as in the ``chars`` task.

Fine-tuning text: the source files of ``STDLIB_MODULES`` in the running interpreter, each found
with ``inspect.getsourcefile`` on the imported module (pure-Python modules and packages'
``__init__.py``). The list is fixed: modules present and pure Python in CPython 3.10–3.13, none
with an import side effect (no GUI, no network). The split is *by file*: a module goes to
validation when the first byte of the BLAKE2b digest of its name is below 256·``VAL_FRACTION``,
so the split depends on nothing but the names (the same on every machine). Files are
concatenated in the list's order, each followed by one blank line; tokens are bytes (0–255).

Prose text (``prose_corpus``): the entries of ``pydoc_data.topics.topics`` (the "help"
topics of the Python reference, English prose with some grammar and code), sorted by topic
name, UTF-8 encoded, each followed by one blank line; split by topic with the same digest rule.

A batch is ``batch_size`` windows at offsets drawn uniformly from ``[0, n - T - 1]`` with a
caller-provided ``torch.Generator`` (x = data[i : i + T], y = data[i + 1 : i + T + 1], nanoGPT's
``get_batch``), so the same generator seed gives the same bytes; evaluation windows are
``n_eval`` windows spread evenly over the split (no randomness).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect

import torch
from torch import Tensor

from ..tasks.base import spread

__all__ = [
    "STDLIB_MODULES",
    "TASKS",
    "VAL_FRACTION",
    "ByteCorpus",
    "play_bytes",
    "prose_corpus",
    "stdlib_corpus",
]

#: the fine-tuning corpus: well-known pure-Python standard-library modules (by import name)
STDLIB_MODULES = (
    "argparse",
    "ast",
    "base64",
    "bisect",
    "calendar",
    "cmd",
    "code",
    "codecs",
    "colorsys",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "difflib",
    "dis",
    "enum",
    "filecmp",
    "fnmatch",
    "fractions",
    "ftplib",
    "functools",
    "getopt",
    "gettext",
    "glob",
    "gzip",
    "heapq",
    "hmac",
    "inspect",
    "ipaddress",
    "json",
    "keyword",
    "linecache",
    "locale",
    "logging",
    "mimetypes",
    "numbers",
    "operator",
    "optparse",
    "pickle",
    "pprint",
    "queue",
    "quopri",
    "random",
    "reprlib",
    "sched",
    "secrets",
    "selectors",
    "shlex",
    "shutil",
    "smtplib",
    "statistics",
    "string",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "timeit",
    "tokenize",
    "traceback",
    "typing",
    "uuid",
    "warnings",
    "weakref",
)
#: share of the modules (by name digest) held out for validation
VAL_FRACTION = 0.2


def is_validation(module: str) -> bool:
    """Whether ``module`` is a held-out file (a digest of its name; see the module docstring)."""
    return hashlib.blake2b(module.encode(), digest_size=8).digest()[0] < 256 * VAL_FRACTION


def _source(module: str) -> bytes:
    try:
        path = inspect.getsourcefile(importlib.import_module(module))
    except (ImportError, TypeError) as err:
        raise ImportError(f"standard-library module {module!r} has no Python source here") from err
    if path is None:
        raise ImportError(f"standard-library module {module!r} has no Python source here")
    with open(path, "rb") as f:
        return f.read()


@functools.lru_cache(maxsize=1)
def stdlib_corpus() -> dict[str, bytes]:
    """``{"train": bytes, "val": bytes, "train_files": ..., "val_files": ...}`` of the
    standard-library source (read once per process)."""
    out: dict = {"train": [], "val": [], "train_files": [], "val_files": []}
    for module in STDLIB_MODULES:
        split = "val" if is_validation(module) else "train"
        out[split].append(_source(module) + b"\n\n")
        out[f"{split}_files"].append(module)
    return {k: (b"".join(v) if k in ("train", "val") else tuple(v)) for k, v in out.items()}


@functools.lru_cache(maxsize=1)
def prose_corpus() -> dict[str, bytes]:
    """``{"train": bytes, "val": bytes, "train_files": ..., "val_files": ...}`` of the
    reference topics of ``pydoc_data.topics`` (module docstring), split by topic name."""
    from pydoc_data.topics import topics

    out: dict = {"train": [], "val": [], "train_files": [], "val_files": []}
    for name in sorted(topics):
        split = "val" if is_validation(name) else "train"
        out[split].append(topics[name].encode("utf-8") + b"\n\n")
        out[f"{split}_files"].append(name)
    return {k: (b"".join(v) if k in ("train", "val") else tuple(v)) for k, v in out.items()}


#: the fine-tuning tasks: name -> the function returning its split corpus
TASKS = {"stdlib": stdlib_corpus, "prose": prose_corpus}


@functools.lru_cache(maxsize=1)
def play_bytes() -> bytes:
    """The cleaned plays of the ``chars`` task as ASCII bytes."""
    from ..tasks.chars import corpus

    return corpus().encode("ascii")


def _ids(data: bytes) -> Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


class ByteCorpus:
    """Train and validation bytes as token ids with window sampling (module docstring).

    Args:
        train, val: the two splits as ``bytes``.
        seq_len: window length T.
        max_bytes: keep only the first that many bytes of each split (tiny test sizes).
    """

    vocab_size = 256

    def __init__(self, train: bytes, val: bytes, seq_len: int, max_bytes: int | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len}")
        cut = slice(None, max_bytes)
        self.seq_len = int(seq_len)
        self.data = {"train": _ids(train[cut]), "val": _ids(val[cut])}
        for split, data in self.data.items():
            if len(data) <= self.seq_len + 1:
                raise ValueError(
                    f"the {split} split ({len(data)} bytes) is shorter than one window of "
                    f"seq_len + 1 = {self.seq_len + 1}"
                )

    @classmethod
    def stdlib(cls, seq_len: int, max_bytes: int | None = None) -> ByteCorpus:
        corpus = stdlib_corpus()
        return cls(corpus["train"], corpus["val"], seq_len, max_bytes)

    @classmethod
    def task(cls, name: str, seq_len: int, max_bytes: int | None = None) -> ByteCorpus:
        """The corpus of the fine-tuning task ``name`` (a key of ``TASKS``)."""
        if name not in TASKS:
            raise ValueError(f"unknown fine-tuning task {name!r}; valid: {', '.join(TASKS)}")
        corpus = TASKS[name]()
        return cls(corpus["train"], corpus["val"], seq_len, max_bytes)

    @classmethod
    def plays(cls, seq_len: int, max_bytes: int | None = None) -> ByteCorpus:
        text = play_bytes()[:max_bytes]
        cut = int(0.9 * len(text))
        return cls(text[:cut], text[cut:], seq_len)

    @property
    def sizes(self) -> dict[str, int]:
        """Bytes per split."""
        return {split: len(data) for split, data in self.data.items()}

    def windows(self, split: str, starts: Tensor) -> tuple[Tensor, Tensor]:
        """(inputs, next-byte targets), each (len(starts), T)."""
        chunk = self.data[split][starts[:, None] + torch.arange(self.seq_len + 1)]  # (B, T + 1)
        return chunk[:, :-1], chunk[:, 1:]

    def batch(self, split: str, batch_size: int, generator: torch.Generator):
        """``batch_size`` random windows of ``split`` drawn with ``generator``."""
        high = len(self.data[split]) - self.seq_len - 1
        starts = torch.randint(0, high + 1, (batch_size,), generator=generator)
        return self.windows(split, starts)

    def eval_windows(self, split: str, n_eval: int) -> tuple[Tensor, Tensor]:
        """``n_eval`` windows spread evenly over ``split`` (all non-overlapping ones if fewer)."""
        n = (len(self.data[split]) - 1) // self.seq_len
        return self.windows(split, spread(n, n_eval) * self.seq_len)
