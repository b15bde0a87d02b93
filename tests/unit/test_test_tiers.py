"""The `full` tier's convention (tests/conftest.py, docs/architecture.md): every use of
``pytest.mark.full`` is preceded by a ``# full`` comment that names what covers its story in
`make test`, and the tier is left out of `make test` but run by `make test-all`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

TESTS = Path(__file__).resolve().parents[1]
REPO = TESTS.parent


def full_marks() -> list[tuple[Path, int, list[str]]]:
    """(file, line number, the comment block above it) for every use of the mark."""
    found = []
    for path in sorted(TESTS.rglob("*.py")):
        if path.name in ("conftest.py", Path(__file__).name):
            continue
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            if "pytest.mark.full" in line:
                j = i
                while j > 0 and lines[j - 1].startswith("#"):
                    j -= 1
                found.append((path, i + 1, lines[j:i]))
    return found


def test_every_full_test_says_what_covers_its_story_in_make_test():
    marks = full_marks()
    assert len(marks) >= 10, marks  # the tier exists (README "Tests" lists it)
    for path, line, comment in marks:
        text = " ".join(comment)
        where = f"{path.relative_to(REPO)}:{line}"
        assert text.startswith("# full"), f"{where}: no `# full` comment above the mark"
        assert re.search(r"make test\b|unit-tested|unit tests", text), \
            f"{where}: the comment does not say what covers the story in make test: {text!r}"


def test_make_test_leaves_the_tier_out_and_make_test_all_runs_it():
    makefile = (REPO / "Makefile").read_text()
    test = re.search(r"^test: setup\n((?:\t.*\n)+)", makefile, re.M).group(1)
    test_all = re.search(r"^test-all: setup\n((?:\t.*\n)+)", makefile, re.M).group(1)
    assert "PHOENIX_FULL" not in test and "PHOENIX_FULL=1" in test_all
    assert "make test" in (REPO / ".ci" / "run").read_text()
