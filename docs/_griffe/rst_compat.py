"""A griffe extension that renders the reStructuredText habits of our docstrings in Markdown.

The code's docstrings are written to be read in a terminal: they use RST *simple tables*
(columns delimited by ``====`` rules), RST section underlines (``Title`` over ``-----``) and a
few Sphinx roles (``:class:`x```). Markdown would run the tables together into one paragraph and
turn an underline into a page heading, so before mkdocstrings renders a docstring this extension
rewrites, in the docstring text only (never in the code):

* simple tables into pipe tables (continuation lines, whose first column is blank, are joined to
  the row above; ``|`` inside a cell is escaped);
* ``Title`` / ``-----`` underlines into a bold line;
* ``:role:`target``` into the inline code ``target``.

Loaded from ``mkdocs.yml`` (``extensions: [docs/_griffe/rst_compat.py:RstCompat]``).
"""

from __future__ import annotations

import re

import griffe

_RULE = re.compile(r"^(\s*)(=+)(\s+=+)*\s*$")
_UNDERLINE = re.compile(r"^\s*-{3,}\s*$")
_ROLE = re.compile(r":(?:class|mod|func|meth|attr|obj|data|exc):`~?([^`]+)`")


def _columns(rule: str) -> list[tuple[int, int]]:
    """(start, end) of every run of '=' in a border line; the last column runs to the end."""
    spans = [(m.start(), m.end()) for m in re.finditer(r"=+", rule)]
    starts = [s for s, _ in spans]
    return [(s, starts[i + 1] if i + 1 < len(starts) else 10**6) for i, s in enumerate(starts)]


def _cells(line: str, columns: list[tuple[int, int]]) -> list[str]:
    """The cells of one line: split at runs of two or more spaces when that gives one cell per
    column (cells that overflow their border still land right), else at the border positions."""
    pieces = re.split(r"\s{2,}", line.strip())
    if not line[:1].isspace() and len(pieces) == len(columns):
        return pieces
    return [line[start:end].strip() for start, end in columns]


def _escape_pipes(cell: str) -> str:
    """Escape '|' outside code spans (inside them the table parser already leaves it alone)."""
    parts = re.split(r"(`+[^`]*`+)", cell)
    return "".join(p if p.startswith("`") else p.replace("|", r"\|") for p in parts)


def _pipe_row(cells: list[str]) -> str:
    return "| " + " | ".join(_escape_pipes(c) for c in cells) + " |"


def _rows(lines: list[str], columns: list[tuple[int, int]]) -> list[list[str]]:
    """Rows of cells; a line whose first cell is blank continues the row above."""
    rows: list[list[str]] = []
    for line in lines:
        cells = _cells(line, columns)
        if rows and not cells[0]:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells)]
        else:
            rows.append(cells)
    return rows


def _table(lines: list[str], borders: tuple[int, int, int]) -> list[str]:
    """A simple table (border, header, border, body, border) as a Markdown pipe table."""
    top, middle, bottom = borders
    columns = _columns(lines[top])
    header = [" ".join(c).strip() for c in zip(*_rows(lines[top + 1 : middle], columns))]
    body = _rows(lines[middle + 1 : bottom], columns)
    rule = "|" + "|".join("---" for _ in columns) + "|"
    return ["", _pipe_row(header), rule, *(_pipe_row(r) for r in body), ""]


def rst_to_markdown(text: str) -> str:
    """The conversion described in the module docstring."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _RULE.match(line) and line.count("=") >= 4:
            # a simple table spans three border lines; find the closing one
            borders = [i]
            j = i + 1
            while j < len(lines) and len(borders) < 3:
                if _RULE.match(lines[j]):
                    borders.append(j)
                j += 1
            if len(borders) == 3:
                indent = len(line) - len(line.lstrip())
                block = [ln[indent:] for ln in lines[i : borders[2] + 1]]
                out.extend(_table(block, tuple(b - i for b in borders)))
                i = borders[2] + 1
                continue
        if (
            _UNDERLINE.match(line)
            and out
            and out[-1].strip()
            and len(line.strip()) >= len(out[-1].strip())
        ):
            out[-1] = f"**{out[-1].strip()}**"
            out.append("")
            i += 1
            continue
        out.append(line)
        i += 1
    return _ROLE.sub(r"`\1`", "\n".join(out))


class RstCompat(griffe.Extension):
    """Rewrite each docstring once, when griffe has built its object."""

    def on_object(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
