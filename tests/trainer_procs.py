"""A training script as a subprocess, followed through its log (tests that kill trainers)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path


class Proc:
    """A training subprocess whose stderr we follow to know which step it reached."""

    def __init__(self, env: dict[str, str], script: Path, args: list[str]) -> None:
        self.p = subprocess.Popen([sys.executable, str(script), *args], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.step = -1
        self.start_step: int | None = None
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._follow, daemon=True)
        self._t.start()

    def _follow(self) -> None:
        for line in self.p.stderr:
            self.lines.append(line)
            if " at step " in line and ("starting run" in line or "resuming run" in line):
                self.start_step = int(line.split(" at step ")[1].split()[0])
                self.step = self.start_step
            elif "phoenix.trainer" in line and "] step " in line:
                self.step = int(line.split("] step ")[1].split()[0])

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.step < step:
            assert self.p.poll() is None, "trainer exited early:\n" + "".join(self.lines[-30:])
            assert time.monotonic() < deadline, f"trainer never reached step {step}"
            time.sleep(0.005)

    def finish(self, timeout: float = 120) -> int:
        rc = self.p.wait(timeout)
        self._t.join(5)
        return rc


def env_for(s3_server, uri: str, attempt: int, tmp_path: Path, **extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHOENIX_", "AWS_"))}
    env.update(s3_server.env())
    env.update({"PHOENIX_CHECKPOINT_URI": uri, "PHOENIX_ATTEMPT": str(attempt),
                "PHOENIX_PHASE": "train", "PHOENIX_JOB_NAME": "kill-test",
                "PHOENIX_JOB_NAMESPACE": "tests", "OMP_NUM_THREADS": "1",
                "PHOENIX_TERMINATION_LOG": str(tmp_path / f"termination-{attempt}")})
    # Start-up is mostly compiling torch's Python files; let the subprocesses cache bytecode
    # outside the repo and the venv.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(Path.home() / ".cache" / "phoenix" / "pycache")
    env.update(extra)
    return env
