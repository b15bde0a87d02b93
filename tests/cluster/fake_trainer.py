"""A tiny stand-in for the trainer that honours the whole operator contract, fast.

It reads the Phoenix env (via phoenix_trainer.core.contract), resumes from PHOENIX_RESUME_FROM,
writes real checkpoints with the trainer's manifest-last writer, stops at a step boundary
on SIGTERM with an emergency checkpoint and a "preempted" termination message, and can be
told to crash. Behaviour knobs (env): FAKE_STEPS, FAKE_STEP_SECONDS, FAKE_CKPT_EVERY,
FAKE_CKPT_UNTIL (no checkpoints after this step), FAKE_EMERGENCY_SAVE ("0": no emergency
checkpoint on SIGTERM, as a trainer whose save does not fit the grace period; a benchmark
uses it to keep the checkpoints it placed the newest), FAKE_FAIL_ATTEMPTS ("2,3": exit 1
in those attempts after FAKE_FAIL_AFTER steps), FAKE_RECORD ("host:port" of a test's
beacon; one JSON message per start).

It runs in the trainer image, mounted from a ConfigMap (tests/cluster/conftest.py).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import tempfile
import time

from phoenix_trainer.core.contract import TerminationMessage, TrainerEnv
from phoenix_trainer.core.layout import split_checkpoint_uri
from phoenix_trainer.core.storage import open_storage
from phoenix_trainer.core.writer import apply_retention, commit_checkpoint

stop = False


def on_term(*_):
    global stop
    stop = True  # cooperative: acted on at the next step boundary


def main() -> int:
    signal.signal(signal.SIGTERM, on_term)
    env = TrainerEnv.from_env()
    steps = int(os.environ.get("FAKE_STEPS", "10"))
    step_seconds = float(os.environ.get("FAKE_STEP_SECONDS", "0.05"))
    every = int(os.environ.get("FAKE_CKPT_EVERY", "5"))
    until = int(os.environ.get("FAKE_CKPT_UNTIL", str(10**9)))
    fail_attempts = {int(a) for a in os.environ.get("FAKE_FAIL_ATTEMPTS", "").split(",") if a}
    fail_after = int(os.environ.get("FAKE_FAIL_AFTER", "1"))
    emergency = os.environ.get("FAKE_EMERGENCY_SAVE", "1") != "0"
    storage = open_storage(env.checkpoint_uri)
    start = 0
    if env.resume_from:
        _, step = split_checkpoint_uri(env.resume_from)
        start = step or 0
    record = os.environ.get("FAKE_RECORD")
    if record:
        host, port = record.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(json.dumps({"attempt": env.attempt, "resume_from": env.resume_from,
                                  "init_from": env.init_from, "start": start,
                                  "time": time.time(),
                                  # the downward API's value (the spool's default limit)
                                  "ephemeral_mb": os.environ.get("PHOENIX_EPHEMERAL_STORAGE_MB"),
                                  }).encode())
    last_ckpt = env.resume_from

    def save(step: int) -> str:
        with tempfile.NamedTemporaryFile("wb", delete=False) as f:
            f.write(os.urandom(256) + step.to_bytes(8, "big"))
        try:
            info = commit_checkpoint(storage, step, {"state.bin": f.name}, epoch=0,
                                     phase=env.phase, config_fingerprint="fake",
                                     attempt=env.attempt)
        finally:
            os.unlink(f.name)
        apply_retention(storage, env.checkpoint_keep, protect=[start])
        return info.uri

    step = start
    while step < steps:
        if stop:
            saved = emergency and step > start
            uri = save(step) if saved else last_ckpt
            TerminationMessage("preempted", step=step, checkpoint=uri,
                               emergencySaveCompleted=saved,
                               message=f"SIGTERM at step {step}").write()
            return 143
        time.sleep(step_seconds)
        step += 1
        if env.attempt in fail_attempts and step - start >= fail_after:
            TerminationMessage("failed", step=step, checkpoint=last_ckpt,
                               message=f"injected failure at step {step}").write()
            print("injected failure", file=sys.stderr)
            return 1
        if step % every == 0 and step <= until:
            last_ckpt = save(step)
    TerminationMessage("completed", step=step, checkpoint=last_ckpt, message="done").write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
