"""Start, probe and stop the lab's long-running processes (servers, kubelets, containerd).

A service is a child process detached into its own session, with its log in the state dir
and a pidfile so a later CLI call (``phoenix-lab down``) can stop what ``up`` started.
"""
from __future__ import annotations

import errno
import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence


class LabError(RuntimeError):
    """A lab component could not be started or reached; the message says what to do."""


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return False
            raise
    return True


def require_free_port(port: int, what: str, host: str = "127.0.0.1") -> None:
    if not port_is_free(port, host):
        raise LabError(
            f"port {port} on {host} is already in use, so {what} cannot listen there; "
            "stop the process holding it (ss -ltnp) or choose other ports for the lab"
        )


# Where ``free_port`` picks: below the kernel's ephemeral range (ip_local_port_range,
# 32768-60999 by default) and the NodePort range (30000-32767). A port the kernel picked for
# bind(0) is an ephemeral one: between the check and the server's own bind (a torchrun's
# store, seconds later on loaded cores) an outgoing connection could take it - a gang test
# failed with EADDRINUSE that way.
_PORTS = range(20000, 30000)
_handed_out: set[int] = set()


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback TCP port nothing listens on now, for a server started later: outside the
    range outgoing connections draw from, and never the same one twice in this process."""
    if _ephemeral_low() > _PORTS.stop:
        rng = random.Random()
        for _ in range(500):
            port = rng.randrange(_PORTS.start, _PORTS.stop)
            if port not in _handed_out and port_is_free(port):
                _handed_out.add(port)
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # a host with other ranges
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still answers kill(0); treat it as dead.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@dataclass
class Service:
    """One lab process: its command, log file and pidfile under the state dir."""

    name: str
    argv: Sequence[str]
    state_dir: Path
    env: dict[str, str] | None = None
    ready: Callable[[], bool] | None = None
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "run" / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def running(self) -> bool:
        return self.pid() is not None

    def start(self, timeout: float = 60.0) -> None:
        if self.running():
            self.wait_ready(timeout)
            return
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(self.env or {})
        log = open(self.logfile, "ab")
        self._proc = subprocess.Popen(
            list(self.argv), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, start_new_session=True, cwd=self.state_dir,
        )
        log.close()
        self.pidfile.write_text(str(self._proc.pid))
        self.wait_ready(timeout)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise LabError(
                    f"{self.name} exited with code {self._proc.returncode} during start-up; "
                    f"last log lines:\n{self.tail()}"
                )
            if self.ready is None or self.ready():
                return
            if time.monotonic() > deadline:
                raise LabError(f"{self.name} not ready after {timeout:.0f}s; log:\n{self.tail()}")
            time.sleep(0.2)

    def stop(self, grace: float = 10.0) -> None:
        pid = self.pid()
        if pid is not None:
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + grace
            while pid_alive(pid) and time.monotonic() < deadline:
                if self._proc is not None:
                    self._proc.poll()
                time.sleep(0.1)
            if pid_alive(pid):
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        self.pidfile.unlink(missing_ok=True)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def tcp_ready(port: int, host: str = "127.0.0.1") -> Callable[[], bool]:
    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False
    return check


def http_ready(url: str) -> Callable[[], bool]:
    """A readiness check: the URL answers 200."""
    import urllib.request

    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                return r.status == 200
        except OSError:
            return False
    return check
