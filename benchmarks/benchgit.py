"""The 'old' side of a same-run comparison: another revision's trainer_image, from git."""
from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def old_tree(rev: str, tmp: Path) -> Path:
    """trainer_image of ``rev`` (git archive), for the 'old' variant's PYTHONPATH."""
    dest = tmp / "old"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "trainer_image"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest / "trainer_image"


def commit_of(rev: str) -> str:
    """The commit ``rev`` names (for the results)."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], capture_output=True,
                          text=True).stdout.strip()
