"""The documentation site builds strictly: every page, link, snippet and API reference resolves.

``mkdocs build --strict`` (MkDocs + Material + mkdocstrings) into a temporary directory; the test
is skipped when the documentation tools are not installed. It runs WITHOUT ``--quiet``: quiet
mode raises the log level above WARNING, so strict mode never sees a warning and cannot fail on
one. Strict mode turns every warning into a failure (a broken cross-reference, a missing snippet
file or marker, a page outside the nav, an API reference to an object that no longer exists, a
docstring griffe cannot parse), and the test also fails on any ``WARNING`` line in the log. The
control builds a copy of the site with one broken link planted and asserts that it fails.
Build by hand from the repository root (snippet and extension paths are relative to it):

    NO_MKDOCS_2_WARNING=1 .venv/bin/mkdocs build --strict --site-dir /tmp/site
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: what a build of the site reads besides docs/ and mkdocs.yml (API reference, snippets)
SOURCES = ("quotopt", "manifolds", "examples", "benchmarks")


def _require_tools():
    for module in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        pytest.importorskip(module)


def _build(root: Path, site: Path) -> tuple[int, str, list[str]]:
    """(exit status, log, warning lines) of ``mkdocs build --strict`` of the site in ``root``."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's banner, not a build warning
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict",
         "--config-file", str(root / "mkdocs.yml"), "--site-dir", str(site)],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    log = result.stdout + result.stderr
    warnings = [line for line in log.splitlines() if re.match(r"\s*WARNING\b", line)]
    return result.returncode, log, warnings


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    _require_tools()
    code, log, warnings = _build(ROOT, tmp_path / "site")
    assert code == 0 and not warnings, log
    assert "Building documentation" in log  # the log was not silenced
    assert (tmp_path / "site" / "index.html").is_file()
    reference = (tmp_path / "site" / "reference" / "manifolds" / "index.html").read_text()
    assert "HeadQK" in reference and "project_horizontal" in reference


@pytest.mark.slow
def test_mkdocs_build_fails_on_a_planted_broken_link(tmp_path):
    """The control: the same build of a copy of the site, with one link to a missing page."""
    _require_tools()
    copy = tmp_path / "repo"
    shutil.copytree(DOCS, copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            (copy / name).symlink_to(ROOT / name, target_is_directory=True)
    index = copy / "docs" / "index.md"
    index.write_text(index.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    code, log, warnings = _build(copy, tmp_path / "site")
    assert code != 0, log
    assert any("no-such-page.md" in line for line in warnings), log


def test_every_example_is_on_the_examples_page():
    page = (DOCS / "examples.md").read_text()
    for script in (ROOT / "examples").glob("*.py"):
        assert f'--8<-- "examples/{script.name}"' in page, script.name


def test_nav_lists_every_page():
    """Pages outside the nav fail the strict build only as a warning class we configure; check it
    here too, so the message names the page (docs/results.md may be added by a later study)."""
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", nav, flags=re.M))
    missing = pages - listed - {"results.md"}
    assert not missing, f"pages missing from the nav in mkdocs.yml: {sorted(missing)}"
    assert listed <= pages, f"nav entries without a page: {sorted(listed - pages)}"


def _control_characters(text: str) -> list[int]:
    """Line numbers of ``text`` with a control character other than the newline — what a
    TeX command written into a Python string as ``"\\tilde"`` or ``"\\times"`` becomes."""
    return [
        i for i, line in enumerate(text.split("\n"), 1) if re.search(r"[\x00-\x09\x0b-\x1f]", line)
    ]  # not ``splitlines``: it splits at \x0b and \x0c, the characters it should find


def test_no_page_holds_a_control_character():
    pages = sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]
    bad = {str(p.relative_to(ROOT)): _control_characters(p.read_text()) for p in pages}
    assert {k: v for k, v in bad.items() if v} == {}
    assert _control_characters("$\tilde P$") == [1]  # the control: a tab where \t was meant
    assert _control_characters("x\n$\varepsilon$") == [2]  # a vertical tab where \v was meant
