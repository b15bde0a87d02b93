"""A training script as a subprocess, followed through its log (tests that kill trainers)."""
from __future__ import annotations

import atexit
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from phoenix_lab import samples
from phoenix_lab.procs import free_port

# "... INFO phoenix.trainer: [ns/job/phase] step 12 ..." (Trainer) or "phoenix.example: step 12"
_STEP_LINE = re.compile(r" phoenix\.[\w.]+: (?:\[[^\]]*\] )?step (\d+)\b")

_RANK_PID = re.compile(r" rank (\d+)/\d+\] .* pid (\d+)")

# A trainer that makes no progress for this long dumps its stacks into storage, where a
# test that waited longer for a step reads them (``Proc.hang_dumps``).
HANG_TIMEOUT = 45


class DiskWatch:
    """Largest number of bytes seen in files under ``dirs`` while running (polled every
    ``every`` seconds)."""

    def __init__(self, *dirs, every: float = 0.005) -> None:
        self.dirs, self.every, self.peak, self.stop = dirs, every, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            total = 0
            for d in self.dirs:
                for root, _, names in os.walk(d):
                    for n in names:
                        try:
                            total += os.path.getsize(os.path.join(root, n))
                        except OSError:
                            pass
            self.peak = max(self.peak, total)
            self.stop.wait(self.every)

    def __enter__(self) -> "DiskWatch":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()


class Proc:
    """A training subprocess whose stderr we follow to know which step it reached."""

    def __init__(self, env: dict[str, str], script: Path, args: list[str], nproc: int | None = None) -> None:
        """``nproc``: run under torchrun with that many ranks (loopback rendezvous)."""
        launcher = [] if nproc is None else [
            "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}"]
        # A process group of its own: a test that fails half-way must not leave torchrun's
        # ranks running (and polling S3) after it; ``kill_group`` at exit sees to that.
        self.env = env
        self.p = subprocess.Popen([sys.executable, *launcher, str(script), *args], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                  start_new_session=True)
        atexit.register(self.kill_group)
        self.step = -1
        self.start_step: int | None = None
        self.pids: dict[int, int] = {}  # rank -> pid, from the ranks' start lines
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._follow, daemon=True)
        self._t.start()

    def _follow(self) -> None:
        for line in self.p.stderr:
            self.lines.append(line)
            if " at step " in line and ("starting run" in line or "resuming run" in line):
                self.start_step = int(line.split(" at step ")[1].split()[0])
                self.step = self.start_step
                if (m := _RANK_PID.search(line)):
                    self.pids[int(m.group(1))] = int(m.group(2))
            elif (m := _STEP_LINE.search(line)):
                self.step = int(m.group(1))

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.step < step:
            assert self.p.poll() is None, "trainer exited early:\n" + "".join(self.lines[-30:])
            assert time.monotonic() < deadline, (f"trainer never reached step {step} (at step "
                                                 f"{self.step}):\n" + "".join(self.lines[-30:])
                                                 + self.hang_dumps())
            time.sleep(0.005)
        self.pids.update({r: pid for r, pid in self._ranks_from_proc().items() if r not in self.pids})

    def hang_dumps(self) -> str:
        """The trainer's own stack dumps of this attempt, for a failure message: a step that
        stalls past ``HANG_TIMEOUT`` (set by ``env_for``) has every thread of the process and
        its children dumped into storage (``progress.py``), as on a cluster."""
        from phoenix_trainer.core.heartbeat import HANGS_DIR
        from phoenix_trainer.core.storage import open_storage

        try:
            storage = open_storage(self.env["PHOENIX_CHECKPOINT_URI"])
            keys = storage.list_keys(f"{HANGS_DIR}/attempt-{self.env.get('PHOENIX_ATTEMPT', '0')}/")
            return "".join(f"\n--- {k} ---\n" + storage.get_bytes(k).decode(errors="replace")
                           for k in keys) or "\n(no stack dump in storage)"
        except Exception as e:  # noqa: BLE001 - a diagnostic; the assertion says what failed
            return f"\n(stack dumps unreadable: {type(e).__name__}: {e})"

    def _ranks_from_proc(self) -> dict[int, int]:
        """rank -> pid of the launcher's live workers, from /proc (their RANK variable): a
        rank's start line can be missed when two ranks' unbuffered writes to the one stderr
        pipe interleave on loaded cores."""
        found = {}
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) != self.p.pid:
                    continue
                env = dict(v.split("=", 1) for v in (d / "environ").read_text().split("\0") if "=" in v)
            except (OSError, ValueError, IndexError):
                continue
            if "RANK" in env:
                found[int(env["RANK"])] = int(d.name)
        return found

    def kill_group(self) -> None:
        if self.p.poll() is None:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

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
                "PHOENIX_HANG_TIMEOUT_SECONDS": str(HANG_TIMEOUT), "PHOENIX_HEARTBEAT_SECONDS": "5",
                "PHOENIX_TERMINATION_LOG": str(tmp_path / f"termination-{attempt}")})
    # Start-up is mostly compiling torch's Python files; let the subprocesses cache bytecode
    # outside the repo and the venv.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(Path.home() / ".cache" / "phoenix" / "pycache")
    env.update(extra)
    return env


def first_checkpoint_landed(run_uri: str, min_step: int, timeout: float = 60):
    """A ``ready`` hook for ``kill_and_resume``: the first attempt is killed only once a
    checkpoint at ``min_step`` or later is valid under ``run_uri``. Checkpoints upload in the
    background, so on loaded cores the plan's step can come before the first one lands (the
    first save also starts the upload process), and a SIGKILL then rightly resumes from
    step 0 - not what a test of resuming means to exercise."""
    from phoenix_trainer.core.layout import latest_valid_checkpoint
    from phoenix_trainer.core.storage import open_storage

    def ready(proc: Proc, attempt: int) -> None:
        deadline = time.monotonic() + timeout
        while attempt == 0 and ((newest := latest_valid_checkpoint(open_storage(run_uri))) is None
                                or newest.step < min_step):
            assert time.monotonic() < deadline, \
                f"no checkpoint at step {min_step} by step {proc.step}: {newest}"
            time.sleep(0.05)

    return ready


def kill_and_resume(s3_server, tmp_path: Path, script: Path, args: list[str], run_uri: str,
                    ref_uri: str, plan: list[tuple[int, int]], *, nproc: int | None = None,
                    target=None, expect_rc: dict[int, int] | None = None,
                    between=None, ready=None, **extra_env: str) -> list[int]:
    """Run ``script`` uninterrupted (to ``ref_uri``) and, beside it, killed per ``plan`` —
    (signal, step at which to send it) — and resumed through the env contract (attempt N is
    the N-th process) until it completes. Asserts exit codes and the SIGTERM termination
    messages; returns the steps the resumed processes started from.

    Under torchrun (``nproc``): ``target(proc, attempt)`` picks the pid to signal (default:
    the launcher), ``expect_rc`` maps signal -> the launcher's exit code, and
    ``between(proc, attempt)`` runs after each killed attempt (checks, damage); ``ready(proc,
    attempt)``, where given, blocks after the plan's step until the attempt may be killed."""
    from phoenix_trainer.core.contract import TerminationMessage

    expect_rc = expect_rc or {signal.SIGKILL: -signal.SIGKILL, signal.SIGTERM: 143}
    (tmp_path / "ref").mkdir(exist_ok=True)
    ref = Proc(env_for(s3_server, ref_uri, 0, tmp_path / "ref", **extra_env), script, args, nproc)
    starts = []
    for attempt, (sig, at) in enumerate(plan):
        proc = Proc(env_for(s3_server, run_uri, attempt, tmp_path, PHOENIX_GRACE_SECONDS="30",
                            **extra_env), script, args, nproc)
        proc.wait_for_step(at)
        if ready is not None:
            ready(proc, attempt)
        os.kill(target(proc, attempt) if target else proc.p.pid, sig)
        rc = proc.finish()
        starts.append(proc.start_step)
        assert rc == expect_rc[sig], f"exit {rc}:\n" + "".join(proc.lines[-20:])
        if between is not None:
            between(proc, attempt)
        if sig == signal.SIGKILL:
            continue
        msg = TerminationMessage.from_json((tmp_path / f"termination-{attempt}").read_text())
        assert msg.reason == "preempted" and msg.emergencySaveCompleted and msg.step >= at, msg
        assert msg.checkpoint.endswith(f"step-{msg.step:010d}"), msg  # 0 steps lost
    last = Proc(env_for(s3_server, run_uri, len(plan), tmp_path, **extra_env), script, args, nproc)
    assert last.finish() == 0, "".join(last.lines[-30:])
    msg = TerminationMessage.from_json((tmp_path / f"termination-{len(plan)}").read_text())
    assert msg.reason == "completed", msg
    assert ref.finish() == 0, "".join(ref.lines[-30:])
    return [*starts[1:], last.start_step]


def gang_state(uri: str, tmp_path: Path, step: int) -> dict:
    """A gang's newest checkpoint (it must be ``step``) as one plain state dict."""
    from phoenix_trainer.core.storage import open_storage

    return samples.gang_state(open_storage(uri), tmp_path, step)


tensors_equal = samples.tensors_equal  # nested tensors equal bit for bit, other leaves ==
