"""A warm copy of a gang member's process, for its next attempt (``gangRestart: Member``).

A survivor of a lost peer used to re-execute its own command line to join the next attempt:
the interpreter, torch and the script's imports again, most of its rejoin on a loaded node.
Instead, it now hands the next attempt to a copy of itself made before its group existed:

- ``fork()``, called by ``init_from_env`` just before the group is built: a child is forked
  and waits, idle, on a pipe; the parent returns and trains. The child is the process as it
  was at that point of the script: imports done, no group, model or session yet. A re-exec'd
  process would reach the same point with the same code.
- ``hand_over(copy, environ)``, called by ``rejoin.reexec_into``: the parent writes its
  environment (the new attempt's) to the pipe, then execs a small supervisor
  (``python -S -I -c``, no imports). The supervisor keeps the PID torchrun started, forwards
  SIGTERM, SIGINT and SIGHUP to the child, and exits with the child's status (re-raising its
  signal). The exec frees the old attempt's memory and closes its sockets, so peers still
  waiting on them hear of it at once. The child takes the environment, forks its own copy
  for the loss after this one, and returns from ``fork()``: ``init_from_env`` goes on into
  the new attempt's group. The handed environment carries ``PHOENIX_REJOIN_HOW=warm``.
- A parent that ends any other way (finished, failed, killed) closes the pipe, or dies
  (``PR_SET_PDEATHSIG``). Its copy then exits without a word.

There is no copy, and the rejoin re-execs as before, when:

- ``PHOENIX_WARM_REJOIN=0``;
- another Python thread runs at that point (a fork would copy the locks it may hold; torch's
  own native threads are fork-safe, as for its DataLoader workers);
- the copy has died by the time of the loss.

Objects the script made before ``init_from_env()`` are the copy's as they were then (a
DataLoader worker's fork has the same caveat): an open connection made before it is shared
with the parent until the parent's exec closes its side.

The cost is memory: the pages the parent writes after the fork are copied (copy-on-write).
This module never writes to storage and never runs in a signal handler.
"""
from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Mapping

log = logging.getLogger("phoenix.rejoin")

ENV_WARM_REJOIN = "PHOENIX_WARM_REJOIN"  # "0": no warm copy, re-exec
ENV_REJOIN_HOW = "PHOENIX_REJOIN_HOW"  # set in the handed environment: "warm"
HOW_WARM, HOW_REEXEC = "warm", "re-exec"
_PR_SET_PDEATHSIG = 1
# Signals the supervisor passes on; the hang detector's SIGUSR2 it ignores (its child is
# signalled by the trainer's own dumper, stacks.py).
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# The supervisor the parent becomes: no site, no imports beyond built-in modules, ~20 ms.
SUPERVISOR = """\
import os, signal, sys
child = int(sys.argv[1])
def forward(sig, frame):
    try:
        os.kill(child, sig)
    except ProcessLookupError:
        pass
forwarded = (%s)
for s in forwarded:
    signal.signal(s, forward)
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
signal.pthread_sigmask(signal.SIG_UNBLOCK, forwarded)  # blocked over the exec: none is lost
_, status = os.waitpid(child, 0)
code = os.waitstatus_to_exitcode(status)
if code < 0:  # die of the same signal, as the trainer did
    if -code != signal.SIGKILL:
        signal.signal(-code, signal.SIG_DFL)
    os.kill(os.getpid(), -code)
sys.exit(code)
""" % ", ".join(f"signal.{s.name}" for s in FORWARDED)


@dataclass
class Copy:
    """The parent's handle on its waiting copy."""

    pid: int
    fd: int  # the pipe's write end

    def alive(self) -> bool:
        try:
            return os.waitpid(self.pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return False

    def discard(self) -> None:
        """Close the pipe (the copy exits) and reap it; used when the process ends normally."""
        try:
            os.close(self.fd)
        except OSError:
            pass
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


_copy: Copy | None = None
_at_exit = False


def current() -> Copy | None:
    """This process's waiting copy, if it has one that is still alive."""
    return _copy if _copy is not None and _copy.alive() else None


def wanted(environ: Mapping[str, str]) -> str | None:
    """Why no copy is made here, or None if one can be."""
    if environ.get(ENV_WARM_REJOIN, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"{ENV_WARM_REJOIN}=0"
    if not hasattr(os, "fork"):
        return "no fork() here"
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        return f"other Python threads run ({names})"
    return None


def fork(environ: Mapping[str, str] | None = None) -> bool:
    """Leave a waiting copy of this process behind (see the module docstring).

    Returns False in the parent, or where no copy was made. Returns True in the copy, once a
    parent has handed it an attempt; ``os.environ`` is then the parent's, and the copy has
    forked its own copy already."""
    global _copy, _at_exit
    environ = os.environ if environ is None else environ
    handed = False
    while True:
        why_not = wanted(environ)
        if why_not is not None:
            log.info("no warm copy of this process for a rejoin (%s): a rejoin re-execs", why_not)
            _copy = None
            return handed
        _flush()
        read_end, write_end = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid:  # the parent: trains on
            os.close(read_end)
            _copy = Copy(pid, write_end)
            if not _at_exit:  # inherited by the copies, so once per line of processes
                atexit.register(discard)
                _at_exit = True
            return handed
        os.close(write_end)
        _copy = None
        env = _wait(read_end, parent)  # exits unless handed an attempt
        os.environ.clear()
        os.environ.update(env)
        handed = True  # and leave a copy of this one behind for the next loss


def hand_over(copy: Copy, environ: Mapping[str, str]) -> None:
    """Give the next attempt to ``copy`` and become its supervisor; returns only if the copy
    could not take it (the caller re-execs). The caller flushed its output and marked its
    descriptors close-on-exec."""
    payload = json.dumps({**environ, ENV_REJOIN_HOW: HOW_WARM}).encode()
    # A SIGTERM from here to the supervisor's handlers stays pending over the exec (the mask
    # and pending signals survive it), then goes to the copy: an eviction is not lost.
    signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(copy.fd, view):]
        os.close(copy.fd)
    except OSError:  # the copy is gone (EPIPE): nothing was handed over
        signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
        return
    try:
        os.execv(sys.executable, [sys.executable, "-S", "-I", "-c", SUPERVISOR, str(copy.pid)])
    except OSError:  # the copy has the attempt now: supervise it from here
        supervise(copy.pid)


def supervise(pid: int) -> None:
    """The supervisor's work in this interpreter (when its exec failed); never returns."""
    scope: dict = {"__name__": "__supervisor__"}
    sys.argv = [sys.argv[0], str(pid)]
    exec(compile(SUPERVISOR, "<supervisor>", "exec"), scope)  # noqa: S102 - our own constant


def discard() -> None:
    """A process that ends normally takes its copy with it (it would stay a zombie)."""
    global _copy
    copy, _copy = _copy, None
    if copy is not None:
        copy.discard()


def _wait(fd: int, parent: int) -> dict[str, str]:
    """In the copy: block until the parent hands over (its environment) or ends (exit)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # no KeyboardInterrupt traceback from here
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # the hang detector's dump signal
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # the closed pipe still tells
    if os.getppid() != parent:  # it died before the prctl
        os._exit(0)
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except OSError:
            os._exit(0)
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    if not chunks:  # the parent ended without a loss
        os._exit(0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    # The copy is on its own from here: its supervisor forwards signals to it, and it dies
    # with the supervisor (the death signal set above stays: the supervisor is its parent).
    return json.loads(b"".join(chunks))


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
