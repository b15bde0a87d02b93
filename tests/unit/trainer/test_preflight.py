"""The trainer image's start-up check: a clear message instead of torch's import error."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest

from phoenix_trainer.preflight import spool_problem

pytestmark = pytest.mark.unit


def test_a_writable_spool_passes(tmp_path):
    assert spool_problem({"PHOENIX_SPOOL_DIR": str(tmp_path / "spool")}) is None
    assert (tmp_path / "spool").is_dir()


def test_an_unwritable_spool_is_named(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    problem = spool_problem({"PHOENIX_SPOOL_DIR": str(blocker / "spool")})
    assert problem and "PHOENIX_SPOOL_DIR" in problem and "emptyDir at /tmp" in problem


def test_no_usable_temp_dir_exits_1_with_the_message_and_a_termination_message(tmp_path):
    """Run as the image's sitecustomize does: before anything else is imported."""
    missing = tmp_path / "gone"
    term = tmp_path / "termination"
    env = dict(os.environ, TMPDIR=str(missing), PHOENIX_TERMINATION_LOG=str(term),
               PHOENIX_SPOOL_DIR=str(missing / "spool"))
    code = ("import tempfile; tempfile.tempdir = None; "
            "tempfile._candidate_tempdir_list = lambda: [%r]; "
            "import phoenix_trainer.preflight as p; p.main(); print('not reached')" % str(missing))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          cwd=tempfile.gettempdir())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "not reached" not in proc.stdout
    assert "PHOENIX_SPOOL_DIR" in proc.stderr and "emptyDir at /tmp" in proc.stderr
    assert '"reason": "failed"' in term.read_text()
