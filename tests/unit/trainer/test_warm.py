"""warm.py with real processes (no torch, no group): a process leaves a waiting copy of itself,
hands it an environment and becomes its supervisor; the copy goes on from the fork with that
environment. What torchrun would see (the PID it started, the exit status, SIGTERM reaching
the trainer) and what is left behind (nothing) is checked here; the gang around it in
tests/storage/test_gang_rejoin.py."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phoenix_trainer import warm

pytestmark = pytest.mark.unit
TRAINER = Path(__file__).resolve().parents[3] / "trainer_image"

SCRIPT = """
import json, os, signal, sys, threading, time
sys.path.insert(0, {trainer!r})
from phoenix_trainer import warm
mode, out = sys.argv[1], sys.argv[2]

def say(**kw):
    with open(out, "a") as f:
        f.write(json.dumps(kw) + "\\n")

if mode == "thread":
    threading.Thread(target=time.sleep, args=(5,), name="busy", daemon=True).start()
if warm.fork():
    copy = warm.current()
    say(role="copy", pid=os.getpid(), ppid=os.getppid(), attempt=os.environ.get("ATTEMPT"),
        how=os.environ.get(warm.ENV_REJOIN_HOW), next=copy.pid if copy else None)
    if mode == "term":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        say(role="waiting")
        time.sleep(60)
    if mode == "killed":
        say(role="waiting")
        time.sleep(60)
    sys.exit(7)
copy = warm.current()
say(role="parent", pid=os.getpid(), copy=copy.pid if copy else None,
    why_not=warm.wanted(os.environ))
if mode in ("end", "thread", "off"):
    sys.exit(0)
if mode == "parent-killed":
    time.sleep(60)
os.environ["ATTEMPT"] = "2"
warm.hand_over(copy, os.environ)
say(role="not handed")
"""


def run(tmp_path: Path, mode: str, env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    script, out = tmp_path / "member.py", tmp_path / f"{mode}.jsonl"
    script.write_text(SCRIPT.format(trainer=str(TRAINER)))
    proc = subprocess.Popen([sys.executable, str(script), mode, str(out)],
                            env={**os.environ, **(env or {})})
    return proc, out


def said(out: Path, role: str | None = None, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(x) for x in out.read_text().splitlines()] if out.exists() else []
        if role is None or any(x["role"] == role for x in lines) or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def gone(pid: int, timeout: float = 5.0) -> bool:
    """Not running any more (exited, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.02)
    return False


def test_the_copy_takes_the_attempt_and_its_exit_status_reaches_the_launcher(tmp_path):
    proc, out = run(tmp_path, "handover")
    assert proc.wait(timeout=30) == 7  # the copy's status, through the PID torchrun started
    parent, copy = said(out)
    assert parent["role"] == "parent" and copy["role"] == "copy", (parent, copy)
    assert copy["pid"] == parent["copy"] != parent["pid"]
    assert copy["ppid"] == proc.pid  # the supervisor is the process that was launched
    assert (copy["attempt"], copy["how"]) == ("2", warm.HOW_WARM)
    assert copy["next"] and gone(copy["next"])  # it left a copy for the next loss, gone now
    assert "not handed" not in out.read_text()


def test_sigterm_to_the_launched_process_reaches_the_copy(tmp_path):
    proc, out = run(tmp_path, "term")
    assert said(out, "waiting")[-1]["role"] == "waiting"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143


def test_a_copy_killed_by_a_signal_is_reported_as_killed_by_it(tmp_path):
    proc, out = run(tmp_path, "killed")
    copy = next(x for x in said(out, "waiting") if x["role"] == "copy")
    os.kill(copy["pid"], signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_a_parent_that_ends_normally_takes_its_copy_with_it(tmp_path):
    proc, out = run(tmp_path, "end")
    assert proc.wait(timeout=30) == 0
    (parent,) = said(out)
    assert parent["copy"] and gone(parent["copy"], timeout=1)


def test_a_parent_killed_outright_takes_its_copy_with_it(tmp_path):
    proc, out = run(tmp_path, "parent-killed")
    parent = said(out, "parent")[0]
    proc.kill()
    proc.wait(timeout=30)
    assert gone(parent["copy"])


@pytest.mark.parametrize("mode, env, why", [
    ("thread", {}, "other Python threads run (busy)"),
    ("off", {warm.ENV_WARM_REJOIN: "0"}, f"{warm.ENV_WARM_REJOIN}=0"),
])
def test_no_copy_where_a_fork_is_unsafe_or_switched_off(tmp_path, mode, env, why):
    proc, out = run(tmp_path, mode, env)
    assert proc.wait(timeout=30) == 0
    (parent,) = said(out)
    assert parent["copy"] is None and parent["why_not"] == why, parent


def test_the_supervisor_is_plain_python_without_imports():
    # It runs as `python -S -I -c`: only built-in modules, compiled here to catch a typo.
    compile(warm.SUPERVISOR, "<supervisor>", "exec")
    assert "import os, signal, sys" in warm.SUPERVISOR
    assert all(f"signal.{s.name}" in warm.SUPERVISOR for s in warm.FORWARDED)
