"""Every ```python block of the guides, README.md, docs/index.md and docs/contributing.md runs,
within a time limit.

Per page, the blocks run in order in one namespace (a fresh ``__main__`` module, as a script),
in a subprocess from a temporary directory, one torch thread, with ``PAGE_TIMEOUT`` seconds for
the whole page. Snippet includes (``--8<-- "path"`` and ``--8<-- "path:section"``, the
``pymdownx.snippets`` syntax the site uses) are expanded as the site shows them; indented fences
(inside an admonition) count too.

A block is skipped only when the line right before its opening fence is the marker

    <!-- fragment -->

(an HTML comment, invisible on the site). It is for code that cannot run alone here — an
excerpt of an example that ``tests/test_examples.py`` runs whole, a multi-process launch — never
for slow code: make a snippet small instead. Controls: a planted broken block fails with its
page and line named, the marker skips it only when it sits right before the fence, and a planted
slow block is stopped at the time limit.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    *sorted((ROOT / "docs" / "guides").glob("*.md")),
    ROOT / "README.md",
    ROOT / "docs" / "index.md",
    ROOT / "docs" / "contributing.md",
]
PAGE_TIMEOUT = 120  # seconds for all the blocks of one page
FRAGMENT = "<!-- fragment -->"
FENCE = re.compile(r"^(?P<indent>[ \t]*)```python\s*$")
INCLUDE = re.compile(r'^\s*--8<--\s+"(?P<path>[^":]+)(?::(?P<section>[\w-]+))?"\s*$')

#: runs the blocks of one page, given as JSON on stdin, in one ``__main__`` namespace
RUNNER = """
import json, linecache, sys, types
main = types.ModuleType("__main__")
sys.modules["__main__"] = main
for block in json.load(sys.stdin):
    linecache.cache[block["where"]] = (len(block["code"]), None,
                                       block["code"].splitlines(True), block["where"])
    exec(compile(block["code"], block["where"], "exec"), main.__dict__)
"""


@dataclass
class Block:
    where: str  # "page:line" of the opening fence
    code: str  # includes expanded, dedented
    fragment: bool


def include(path: str, section: str | None) -> str:
    """The text ``--8<-- "path:section"`` shows: the lines between the section's start and end
    markers, dedented (the site sets ``dedent_subsections``), or the whole file without
    markers."""
    lines = (ROOT / path).read_text().splitlines()
    if section is None:
        return "\n".join(line for line in lines if "--8<-- [" not in line)
    marks = [i for i, line in enumerate(lines) if f"--8<-- [start:{section}]" in line]
    ends = [i for i, line in enumerate(lines) if f"--8<-- [end:{section}]" in line]
    if len(marks) != 1 or len(ends) != 1:
        raise ValueError(f"{path}: section {section!r} not found exactly once")
    return textwrap.dedent("\n".join(lines[marks[0] + 1 : ends[0]]))


def blocks(text: str, name: str) -> list[Block]:
    """The ```python blocks of a page, in order."""
    lines, found, i = text.splitlines(), [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, start, body = len(match["indent"]), i, []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            line = lines[i][indent:]
            inc = INCLUDE.match(line)
            body.append(include(inc["path"], inc["section"]) if inc else line)
            i += 1
        fragment = start > 0 and lines[start - 1].strip() == FRAGMENT
        found.append(Block(f"{name}:{start + 1}", "\n".join(body) + "\n", fragment))
        i += 1
    return found


def run_page(text: str, name: str, cwd: Path, timeout: float = PAGE_TIMEOUT):
    """(return code, output) of the page's runnable blocks; code None when time ran out."""
    payload = json.dumps([vars(b) for b in blocks(text, name) if not b.fragment])
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")  # one torch thread
    try:
        done = subprocess.run(
            [sys.executable, "-c", RUNNER], input=payload, cwd=cwd, env=env,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return None, f"{name}: more than {timeout} s"
    return done.returncode, done.stdout + done.stderr


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


RUNNABLE = [p for p in PAGES if any(not b.fragment for b in blocks(p.read_text(), _name(p)))]


@pytest.mark.slow
@pytest.mark.parametrize("page", RUNNABLE, ids=_name)
def test_page_code_runs(page, tmp_path):
    code, output = run_page(page.read_text(), _name(page), tmp_path)
    assert code == 0, output[-4000:]


def test_pages_with_code_are_found_and_includes_expand():
    assert {"docs/guides/hf.md", "README.md", "docs/index.md"} <= {_name(p) for p in RUNNABLE}
    (home,) = blocks((ROOT / "docs" / "index.md").read_text(), "index")
    assert "import quotopt" in home.code and "quotopt.symmetries(model)" in home.code
    assert "--8<--" not in home.code and not home.code.startswith(" ")  # expanded, dedented
    with pytest.raises(ValueError, match="section 'nowhere' not found"):
        include("examples/quickstart.py", "nowhere")


PLANTED = """# planted
```python
x = 1
```

{marker}
```python
print(undefined_name + x)
```
"""


def test_a_broken_block_fails_unless_marked_as_a_fragment(tmp_path):
    code, output = run_page(PLANTED.format(marker="text"), "planted.md", tmp_path)
    assert code != 0 and "NameError" in output and "planted.md:7" in output
    code, output = run_page(PLANTED.format(marker=FRAGMENT), "planted.md", tmp_path)
    assert code == 0, output
    spaced = PLANTED.format(marker=FRAGMENT + "\n")  # not right before the fence: runs
    code, output = run_page(spaced, "planted.md", tmp_path)
    assert code != 0 and "NameError" in output


def test_a_slow_page_is_stopped_at_its_time_limit(tmp_path):
    slow = "```python\nimport time\ntime.sleep(60)\n```\n"
    code, output = run_page(slow, "slow.md", tmp_path, timeout=10)
    assert code is None and "more than 10 s" in output
