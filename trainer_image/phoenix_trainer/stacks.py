"""Stack dumps of a training process and its children, without ptrace.

``StackDumper`` registers ``faulthandler`` on ``DUMP_SIGNAL`` (SIGUSR2), writing into a file
it keeps open. The handler runs in C, inside the signal, without the GIL: it dumps every
thread's Python frames even when the main thread is stuck in native code (a socket read, a
gloo wait, a CUDA synchronize). Forked children (DataLoader workers) inherit the handler and
the file, so ``dump`` signals this process and then each descendant that runs the same
executable and catches the signal, one at a time, each after a header line, into the same
file. Any other descendant (an exec'd helper, whose default action might kill it, or another
program with its own use of the signal) is never signalled; its kernel state is reported
instead. For every thread of every process the dump adds what ``/proc`` shows
without privileges: the scheduler state (``R`` running, ``S`` sleeping, ``D`` in the kernel,
``T`` stopped) and the kernel function it waits in (``wchan``) - the native part of a hang a
restricted pod (no ``CAP_SYS_PTRACE``) can see. A process that is stopped or frozen dumps
nothing; its ``/proc`` state says so.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import tempfile
import time

DUMP_SIGNAL = signal.SIGUSR2
SETTLE_SECONDS = 0.15  # the file stopped growing for this long: that process is done
MAX_WAIT_SECONDS = 3.0  # per process


class StackDumper:
    def __init__(self, directory: str | None = None) -> None:
        fd, self.path = tempfile.mkstemp(prefix="phoenix-stacks-", suffix=".txt",
                                         dir=directory or _shm_or_tmp())
        self.fd = fd
        faulthandler.register(DUMP_SIGNAL, file=fd, all_threads=True, chain=False)

    def close(self) -> None:
        try:
            faulthandler.unregister(DUMP_SIGNAL)
        finally:
            try:
                os.close(self.fd)
                os.unlink(self.path)
            except OSError:
                pass

    def dump(self, header: str = "") -> str:
        """Every thread of this process and its descendants, as text."""
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)
        if header:
            self._write(header.rstrip("\n") + "\n")
        for pid in [os.getpid(), *descendants(os.getpid())]:
            self._write(f"\n=== process {pid} ({_cmdline(pid)}) ===\n")
            state = _proc_state(pid)
            if state is None:
                self._write("(gone)\n")
                continue
            if state in ("T", "t"):
                self._write(f"state {state}: stopped; it cannot dump its own stacks\n")
            elif pid == os.getpid() or (catches(pid, DUMP_SIGNAL) and _same_program(pid)):
                self._signal_and_wait(pid)
            else:
                self._write(f"not a fork of the trainer that catches {DUMP_SIGNAL.name}: "
                            "kernel state only\n")
            self._write(_threads(pid))
        size = os.fstat(self.fd).st_size
        return os.pread(self.fd, size, 0).decode("utf-8", "replace")

    def _write(self, text: str) -> None:
        os.write(self.fd, text.encode("utf-8", "replace"))

    def _signal_and_wait(self, pid: int) -> None:
        before = os.fstat(self.fd).st_size
        try:
            os.kill(pid, DUMP_SIGNAL)
        except OSError as e:
            self._write(f"cannot signal: {e}\n")
            return
        deadline = time.monotonic() + MAX_WAIT_SECONDS
        last, last_change = before, time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.02)
            size = os.fstat(self.fd).st_size
            if size != last:
                last, last_change = size, time.monotonic()
            elif size > before and time.monotonic() - last_change >= SETTLE_SECONDS:
                return
        if last == before:
            self._write(f"no answer within {MAX_WAIT_SECONDS:g}s\n")
        os.lseek(self.fd, 0, os.SEEK_END)


def _shm_or_tmp() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first, then theirs), from /proc."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            ppid = _ppid(int(entry))
            if ppid is not None:
                parent[int(entry)] = ppid
    out, frontier = [], [pid]
    while frontier:
        kids = sorted(p for p, pp in parent.items() if pp in frontier and p not in out)
        out.extend(kids)
        frontier = kids
    return out


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:
        return None


def _stat_fields(path: str) -> list[str] | None:
    raw = _read(path)
    if raw is None or ")" not in raw:
        return None
    return raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(f"/proc/{pid}/stat")
    return int(fields[1]) if fields else None


def _proc_state(pid: int) -> str | None:
    fields = _stat_fields(f"/proc/{pid}/stat")
    return fields[0] if fields else None


def catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler for ``sig`` (``SigCgt`` in /proc/PID/status)."""
    for line in (_read(f"/proc/{pid}/status") or "").splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (int(sig) - 1) & 1)
    return False


def _same_program(pid: int) -> bool:
    """Whether ``pid`` runs this process's executable (a fork, or the same interpreter): only
    those are signalled. Another program that catches SIGUSR2 (a Go binary catches every
    signal) might act on it, or ignore it and cost the dump its wait."""
    try:
        return os.readlink(f"/proc/{pid}/exe") == os.readlink("/proc/self/exe")
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    raw = _read(f"/proc/{pid}/cmdline") or ""
    return " ".join(raw.split("\0")).strip()[:200] or "?"


def _threads(pid: int) -> str:
    lines = ["kernel view (state, wait channel) per thread:"]
    try:
        tids = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return "kernel view: unavailable\n"
    for tid in tids:
        base = f"/proc/{pid}/task/{tid}"
        fields = _stat_fields(f"{base}/stat")
        comm = (_read(f"{base}/comm") or "?").strip()
        wchan = (_read(f"{base}/wchan") or "").strip() or "-"
        state = fields[0] if fields else "?"
        lines.append(f"  thread {tid} ({comm}): state {state}, waiting in {wchan}")
    return "\n".join(lines) + "\n"
