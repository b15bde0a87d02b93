"""What the runtime needs from its container, checked at interpreter start, before any
import can fail in a confusing way.

The trainer image runs it from a ``.pth`` file in its venv (trainer_image/Dockerfile), so it runs
before the training script imports torch, which itself needs a writable temp dir and dies
with "No usable temporary directory found" under a read-only root filesystem without an
emptyDir at /tmp. Standard library only; never import torch here.
"""
from __future__ import annotations

import os
import sys
import tempfile
from typing import Mapping

from .core.contract import ENV_SPOOL_DIR, REASON_FAILED, TerminationMessage

FIX = ("mount a writable volume there (an emptyDir at /tmp: the container's root filesystem "
       "is read-only)")


def spool_problem(environ: Mapping[str, str] = os.environ) -> str | None:
    """Why the temp dir (torch's caches, HOME in the image) or the checkpoint spool cannot
    be written, or None."""
    spool = environ.get(ENV_SPOOL_DIR)
    try:
        tempfile.gettempdir()
    except OSError as e:
        return (f"no writable temporary directory ({e.strerror or e}); torch's caches and the "
                f"checkpoint spool ({ENV_SPOOL_DIR}={spool!r}) live there: {FIX}")
    spool = spool or tempfile.gettempdir()
    try:
        os.makedirs(spool, exist_ok=True)
        with tempfile.TemporaryFile(dir=spool):
            pass
    except OSError as e:
        return (f"the checkpoint spool {ENV_SPOOL_DIR}={spool!r} is not writable "
                f"({e.strerror or e}): {FIX}, or point {ENV_SPOOL_DIR} at one")
    return None


def main() -> None:
    """Exit 1 with a clear message (stderr and the termination message) on a problem."""
    problem = spool_problem()
    if problem is None:
        return
    print(f"phoenix-trainer: {problem}", file=sys.stderr, flush=True)
    try:
        TerminationMessage(REASON_FAILED, message=problem).write()
    except OSError:
        pass
    os._exit(1)  # from a .pth file: SystemExit would be reported as a site error
