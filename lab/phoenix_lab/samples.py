"""The sample training job (examples/train_mlp.py) as the demo, the chaos suite and the
goodput benchmark run it: its PhoenixJob, its uninterrupted reference run, and the checks
made afterwards (final weights equal the reference, steps lost per attempt).

Everything trains in the trainer image on the lab's nodes, as users run it: the image's
python is the ENTRYPOINT (PhoenixJobs give `args` only), the examples live at
/app/examples/ inside it, and every pod passes the restricted Pod Security Standard the lab
enforces (non-root, read-only root, a writable /tmp only as an emptyDir). Kept in one place
so that all three measure the same thing the same way. No torch import at module level.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from .s3 import S3Endpoint

GROUP, VERSION, PLURAL = "phoenix.dev", "v1alpha1", "phoenixjobs"
# Where trainer_image/Dockerfile puts the examples.
IMAGE_EXAMPLES = "/app/examples"
TRAIN_SCRIPT = f"{IMAGE_EXAMPLES}/train_mlp.py"
EVAL_SCRIPT = f"{IMAGE_EXAMPLES}/eval_mlp.py"
SPOT_LABEL = "phoenix.dev/spot"
SPOT_SCHEDULING = {
    "nodeSelector": {SPOT_LABEL: "true"},
    "tolerations": [{"key": SPOT_LABEL, "operator": "Exists", "effect": "NoSchedule"}],
}
# The reference run stays off the spot pool: no toleration of the spot taint, and a node
# affinity that says so outright (the lab's on-demand node is labelled spot=false; a
# cluster's may carry no such label at all).
ON_DEMAND_SCHEDULING = {
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": SPOT_LABEL, "operator": "NotIn", "values": ["true"]}]}]}}},
}
# What the "restricted" Pod Security Standard asks of a container, plus a read-only root
# (tests/kube_helpers re-exports these for the tests' own pods).
RESTRICTED_CONTAINER = {
    "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True, "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]}, "seccompProfile": {"type": "RuntimeDefault"}}
TMP_VOLUME = {"name": "tmp", "emptyDir": {}}
TMP_MOUNT = {"name": "tmp", "mountPath": "/tmp"}
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
        return [TRAIN_SCRIPT, "--steps", str(self.steps), "--seed", str(self.seed),
                "--step-delay", str(self.step_delay), "--log-every", "1", *self.extra_args]


def credentials_secret(namespace: str, s3: S3Endpoint, name: str = CREDENTIALS_SECRET) -> dict:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key}}


def trainer_container(image: str, args: list[str] | None = None, env: list[dict] | None = None,
                      *, gpu: bool = True) -> dict:
    """The trainer container: the image's ENTRYPOINT (python) with `args`, restricted."""
    c = {"name": "trainer", "image": image, "imagePullPolicy": "Never",
         "env": [{"name": "OMP_NUM_THREADS", "value": "1"}, *(env or [])],
         "securityContext": RESTRICTED_CONTAINER, "volumeMounts": [TMP_MOUNT]}
    if gpu:
        c["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    if args is not None:
        c["args"] = args
    return c


def trainer_pod_spec(image: str, args: list[str] | None = None, env: list[dict] | None = None,
                     *, spot: bool = True) -> dict:
    """A pod spec for the trainer: on a spot GPU node, or (spot=False) on the on-demand node
    without a GPU."""
    return {**(SPOT_SCHEDULING if spot else ON_DEMAND_SCHEDULING), "volumes": [TMP_VOLUME],
            "containers": [trainer_container(image, args, env, gpu=spot)]}


def phoenixjob(name: str, namespace: str, cfg: TrainConfig, checkpoint_uri: str, s3_url: str, *,
               image: str, grace_seconds: int = 10, with_eval: bool = False, spot: bool = True,
               credentials_secret: str = CREDENTIALS_SECRET, max_failures: int = 3) -> dict:
    phases = [{"name": "train", "args": cfg.args()}]
    if with_eval:
        phases.append({"name": "eval", "independent": True,
                       "args": [EVAL_SCRIPT, "--seed", str(cfg.seed)]})
    return {
        "apiVersion": f"{GROUP}/{VERSION}", "kind": "PhoenixJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "template": {"spec": trainer_pod_spec(image, spot=spot)},
            "phases": phases,
            "checkpoint": {"uri": checkpoint_uri, "endpoint": s3_url,
                           "credentialsSecret": credentials_secret, "keep": 3,
                           "intervalSteps": cfg.checkpoint_every},
            "recovery": {"maxFailures": max_failures, "terminationGracePeriodSeconds": grace_seconds,
                         "backoff": {"initialSeconds": 2, "maxSeconds": 30}},
        },
    }


def job_phase(job: dict, phase: str = "train") -> dict:
    for p in (job.get("status") or {}).get("phases") or ():
        if p["name"] == phase:
            return p
    return {}


class ReferenceRun:
    """The uninterrupted run a disrupted job is compared with.

    The same TrainConfig as a PhoenixJob of its own, in the same trainer image on the same
    lab (the image's torch may differ from the host's, so a host run proves nothing about
    the pods' weights), on the on-demand node with no GPU request, started alongside the
    disrupted job and never disrupted. Its final checkpoint is the reference, and its end
    record's training seconds are the "useful time" of goodput.
    """

    def __init__(self, lab: Any, namespace: str, name: str, cfg: TrainConfig, checkpoint_uri: str,
                 *, credentials_secret: str = CREDENTIALS_SECRET,
                 s3: S3Endpoint | None = None) -> None:
        """``s3``: the lab S3 server the run checkpoints to (default versitygw, ``lab.s3``;
        a private CA's endpoint needs ``spec.checkpoint.caBundle`` added to the manifest)."""
        self.lab, self.namespace, self.name, self.cfg = lab, namespace, name, cfg
        self.checkpoint_uri = checkpoint_uri
        self.s3 = s3 or lab.s3
        self.manifest = phoenixjob(name, namespace, cfg, checkpoint_uri, self.s3.url,
                                   image=lab.trainer_image, spot=False, max_failures=0,
                                   credentials_secret=credentials_secret)

    def start(self) -> "ReferenceRun":
        self.lab.kubectl("apply", "-f", "-", input=json.dumps(self.manifest))
        return self

    def job(self) -> dict:
        from kubernetes import client

        with self.lab.api_client() as api:
            return client.CustomObjectsApi(api).get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, self.name)

    def wait(self, timeout: float = 900) -> dict:
        """Wait until the reference job succeeded; its status. Fails loudly otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job()
            phase = (job.get("status") or {}).get("phase")
            if phase == "Succeeded":
                return job
            if phase == "Failed" or time.monotonic() > deadline:
                raise RuntimeError(
                    f"reference run {self.namespace}/{self.name} {phase or 'not started'} "
                    f"(it is never disrupted, so this is a bug or a broken lab): "
                    f"{json.dumps(job.get('status'))[:3000]}")
            time.sleep(1)

    def storage(self):
        return open_phase_storage(f"{self.checkpoint_uri}/train", self.s3)

    def train_seconds(self) -> float:
        """Training time of the run, from its end record (excludes start-up)."""
        from phoenix_trainer.attempt_log import read_metrics

        ends = [r for r in read_metrics(self.storage()) if r.get("event") == "end"]
        if not ends:
            raise RuntimeError(f"no end record in the reference run's metrics ({self.checkpoint_uri})")
        return float(ends[-1]["trainSeconds"])

    def delete(self) -> None:
        self.lab.kubectl("delete", "phoenixjob", self.name, "-n", self.namespace,
                         "--ignore-not-found", "--wait=false", check=False)


def open_phase_storage(checkpoint_uri: str, s3: S3Endpoint):
    from phoenix_trainer.core.storage import Credentials, open_storage

    return open_storage(checkpoint_uri, Credentials(endpoint_url=s3.url, access_key=s3.access_key,
                                                    secret_key=s3.secret_key))


def final_weights_equal(storage, reference_storage) -> tuple[bool, str | None]:
    """Whether the newest valid checkpoints of two runs hold the same model, tensor for
    tensor; and the checked checkpoint's URI (None: `storage` has no valid checkpoint)."""
    import torch

    from phoenix_trainer.checkpoint import load_checkpoint
    from phoenix_trainer.core.layout import latest_valid_checkpoint

    final = latest_valid_checkpoint(storage)
    reference = latest_valid_checkpoint(reference_storage)
    if final is None or reference is None:
        return False, final.uri if final else None
    weights = load_checkpoint(storage, final)["model.pt"]
    ref = load_checkpoint(reference_storage, reference)["model.pt"]
    same = (final.step == reference.step and weights.keys() == ref.keys()
            and all(torch.equal(weights[k], ref[k]) for k in ref))
    return same, final.uri


def gang_state(storage, folder, step: int | None = None) -> dict:
    """A gang's newest valid checkpoint (it must be ``step`` when given) as one plain state
    dict: its DCP objects downloaded into a new folder under ``folder`` and converted to the
    torch.save format."""
    import tempfile
    from pathlib import Path

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from phoenix_trainer.core.layout import latest_valid_checkpoint, step_dir_name

    info = latest_valid_checkpoint(storage)
    assert info is not None and (step is None or info.step == step), info
    d = Path(tempfile.mkdtemp(prefix="gang-", dir=folder))
    for name in info.manifest.files:
        if name.startswith("dcp-"):
            storage.get_file(f"{step_dir_name(info.step)}/{name}", d / name[len("dcp-"):])
    dcp_to_torch_save(d, d / "all.pt")
    return torch.load(d / "all.pt", weights_only=False)


def tensors_equal(a, b) -> bool:
    """Nested dicts/lists of tensors equal bit for bit (``torch.equal``), other leaves ==."""
    import torch

    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def divergence(storage, reference_storage) -> str:
    """Where a run first parted from its reference, for a failed weights check: the first
    step whose logged loss differs (the samples log every step's loss to the attempt's
    metrics), the attempt that logged it and the step that attempt started from, and any
    in-process recoveries; and the two newest valid checkpoints' steps (a run whose final
    save was lost ends on an older one). Attempts killed before they uploaded their metrics
    are missing."""
    from phoenix_trainer.attempt_log import read_metrics
    from phoenix_trainer.core.layout import latest_valid_checkpoint

    ref = {r["step"]: r["loss"] for r in read_metrics(reference_storage) if r.get("event") == "step"}
    records = read_metrics(storage)
    starts = {r["attempt"]: r["step"] for r in records if r.get("event") in ("start", "resume")}
    recovered = [(r["attempt"], r["step"], r.get("restoredStep")) for r in records
                 if r.get("event") == "recovered"]
    logged = sorted((r["step"], r["attempt"], r["loss"]) for r in records
                    if r.get("event") == "step" and r["step"] in ref)
    where = next(((step, attempt, loss) for step, attempt, loss in logged if loss != ref[step]), None)
    if where is None:
        found = (f"all {len(logged)} logged losses (steps {logged[0][0]}-{logged[-1][0]}) equal "
                 "the reference's") if logged else "no logged loss to compare"
    else:
        step, attempt, loss = where
        found = (f"first differing loss at step {step}: {loss!r} against {ref[step]!r}, logged by "
                 f"attempt {attempt}, which started at step {starts.get(attempt, '?')}")
    newest = [getattr(latest_valid_checkpoint(st), "step", None) for st in (storage, reference_storage)]
    return (f"{found}; attempts started at {starts}; in-process recoveries {recovered}; newest "
            f"valid checkpoint at step {newest[0]}, the reference's at step {newest[1]}")


def attempt_starts(storage) -> dict[int, tuple[int, float]]:
    """attempt -> (step it started or resumed from, unix time), from the trainer's metrics."""
    from phoenix_trainer.attempt_log import read_metrics

    return {r["attempt"]: (r["step"], _unix(r["time"])) for r in read_metrics(storage)
            if r.get("event") in ("start", "resume")}


def attempt_ends(storage) -> dict[int, int]:
    """attempt -> the last step it reports having reached: its step, checkpoint and end
    records, and any checkpoint it wrote that a later attempt resumed from (the resume record's
    ``checkpointAttempt``). An attempt's own records upload after its commit, so a SIGKILL
    between the two leaves its newest checkpoint out of its log."""
    from phoenix_trainer.attempt_log import read_metrics

    reached: dict[int, int] = {}
    for r in read_metrics(storage):
        if r.get("step") is None:
            continue
        if r.get("event") in ("step", "end", "checkpoint"):
            reached[r["attempt"]] = max(reached.get(r["attempt"], 0), int(r["step"]))
        elif r.get("event") == "resume" and r.get("checkpointAttempt") is not None:
            writer = int(r["checkpointAttempt"])
            reached[writer] = max(reached.get(writer, 0), int(r["step"]))
    return reached


def attempt_end_times(storage) -> dict[int, float]:
    """attempt -> unix time of its end record (the trainer stopped training)."""
    from phoenix_trainer.attempt_log import read_metrics

    return {r["attempt"]: _unix(r["time"]) for r in read_metrics(storage)
            if r.get("event") == "end"}


def _unix(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


_STEP_LINE = re.compile(r"step (\d+) epoch \d+ loss ([0-9.]+)")


def parse_progress(log: str) -> tuple[int, float] | None:
    """(last step, loss) in a train_mlp.py log, or None before its first step."""
    found = _STEP_LINE.findall(log)
    return (int(found[-1][0]), float(found[-1][1])) if found else None


def logged_progress(lab: Any, namespace: str, pod: str) -> tuple[int, float] | None:
    """(last step, loss) a running trainer pod logged (`kubectl logs`), or None."""
    return parse_progress(lab.pod_logs(namespace, pod))
