"""The sample training job (examples/train_mlp.py) as the demo, the chaos suite and the
goodput benchmark run it: its PhoenixJob, its uninterrupted reference run, and the checks
made afterwards (final weights equal the reference, steps lost per attempt).

Kept in one place so that all three measure the same thing the same way.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from . import paths
from .s3 import S3Endpoint

TRAIN_SCRIPT = paths.REPO_ROOT / "examples" / "train_mlp.py"
EVAL_SCRIPT = paths.REPO_ROOT / "examples" / "eval_mlp.py"
SPOT_SCHEDULING = {
    "nodeSelector": {"phoenix.dev/spot": "true"},
    "tolerations": [{"key": "phoenix.dev/spot", "operator": "Exists", "effect": "NoSchedule"}],
}
CREDENTIALS_SECRET = "s3-credentials"


@dataclass
class TrainConfig:
    """Shape of one run of examples/train_mlp.py; same config => same final weights."""

    steps: int = 400
    step_delay: float = 0.04
    checkpoint_every: int = 25
    seed: int = 0
    extra_args: list[str] = field(default_factory=list)

    def args(self) -> list[str]:
        return [str(TRAIN_SCRIPT), "--steps", str(self.steps), "--seed", str(self.seed),
                "--step-delay", str(self.step_delay), "--log-every", "1", *self.extra_args]


def credentials_secret(namespace: str, s3: S3Endpoint) -> dict:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": CREDENTIALS_SECRET, "namespace": namespace},
            "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}}


def trainer_container(args: list[str] | None = None, env: list[dict] | None = None) -> dict:
    c = {"name": "trainer", "image": "phoenix-trainer:dev", "command": ["python"],
         "env": [{"name": "OMP_NUM_THREADS", "value": "1"}, *(env or [])],
         "resources": {"limits": {"nvidia.com/gpu": "1"}}}
    if args is not None:
        c["args"] = args
    return c


def phoenixjob(name: str, namespace: str, cfg: TrainConfig, checkpoint_uri: str, s3_url: str, *,
               grace_seconds: int = 10, with_eval: bool = False,
               credentials_secret: str = CREDENTIALS_SECRET, max_failures: int = 3) -> dict:
    phases = [{"name": "train", "args": cfg.args()}]
    if with_eval:
        phases.append({"name": "eval", "independent": True,
                       "args": [str(EVAL_SCRIPT), "--seed", str(cfg.seed)]})
    return {
        "apiVersion": "phoenix.dev/v1alpha1", "kind": "PhoenixJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "template": {"spec": {**SPOT_SCHEDULING, "containers": [trainer_container()]}},
            "phases": phases,
            "checkpoint": {"uri": checkpoint_uri, "endpoint": s3_url,
                           "credentialsSecret": credentials_secret, "keep": 3,
                           "intervalSteps": cfg.checkpoint_every},
            "recovery": {"maxFailures": max_failures, "terminationGracePeriodSeconds": grace_seconds,
                         "backoff": {"initialSeconds": 2, "maxSeconds": 30}},
        },
    }


def run_reference(cfg: TrainConfig, workdir: Path) -> tuple[Path, float]:
    """Train without interruption on local files; return (final weights file, train seconds)."""
    workdir.mkdir(parents=True, exist_ok=True)
    out = workdir / "reference.pt"
    env = dict(os.environ, PHOENIX_CHECKPOINT_URI=f"file://{workdir / 'reference-ckpt'}",
               PHOENIX_TERMINATION_LOG=str(workdir / "reference.termination"),
               PHOENIX_CHECKPOINT_INTERVAL_STEPS=str(cfg.checkpoint_every), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *cfg.args(), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"reference run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    train_seconds = json.loads(_last_metrics_end(workdir / "reference-ckpt"))["trainSeconds"]
    return out, float(train_seconds)


def _last_metrics_end(prefix: Path) -> str:
    for path in sorted((prefix / "metrics").glob("attempt-*.jsonl"), reverse=True):
        for line in reversed(path.read_text().splitlines()):
            if '"event": "end"' in line:
                return line
    raise RuntimeError(f"no end record in the metrics under {prefix}")


def open_phase_storage(checkpoint_uri: str, s3: S3Endpoint):
    from phoenix_trainer.storage import open_storage

    return open_storage(checkpoint_uri, endpoint_url=s3.url, access_key=s3.access_key,
                        secret_key=s3.secret_key)


def final_weights_equal(storage, reference: Path) -> tuple[bool, str | None]:
    """Whether the newest valid checkpoint's model equals the reference, tensor for tensor."""
    import torch

    from phoenix_trainer.checkpoint import load_checkpoint
    from phoenix_trainer.layout import latest_valid_checkpoint

    final = latest_valid_checkpoint(storage)
    if final is None:
        return False, None
    weights = load_checkpoint(storage, final)["model.pt"]
    ref = torch.load(reference, weights_only=True)
    same = weights.keys() == ref.keys() and all(torch.equal(weights[k], ref[k]) for k in ref)
    return same, final.uri


def attempt_starts(storage) -> dict[int, tuple[int, float]]:
    """attempt -> (step it started or resumed from, unix time), from the trainer's metrics."""
    from phoenix_trainer.metrics import read_metrics

    return {r["attempt"]: (r["step"], _unix(r["time"])) for r in read_metrics(storage)
            if r.get("event") in ("start", "resume")}


def attempt_ends(storage) -> dict[int, int]:
    """attempt -> the last step it reports having reached (its end record or last step record)."""
    from phoenix_trainer.metrics import read_metrics

    reached: dict[int, int] = {}
    for r in read_metrics(storage):
        if r.get("event") in ("step", "end", "checkpoint") and r.get("step") is not None:
            reached[r["attempt"]] = max(reached.get(r["attempt"], 0), int(r["step"]))
    return reached


def _unix(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


_STEP_LINE = re.compile(rb"step (\d+) epoch \d+ loss ([0-9.]+)")


def logged_progress(log_file: Path) -> tuple[int, float] | None:
    """(last step, loss) a running train_mlp.py printed, or None before its first step."""
    try:
        with open(log_file, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            found = _STEP_LINE.findall(f.read())
    except OSError:
        return None
    return (int(found[-1][0]), float(found[-1][1])) if found else None
