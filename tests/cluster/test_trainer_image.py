"""The images as users run them: built from the repository's Dockerfiles, started by a real
kubelet the way the chart and a PhoenixJob start them (non-root, read-only root filesystem,
all capabilities dropped, restricted Pod Security, a writable /tmp only as an emptyDir).

The operator image's start-up under the chart is covered where the chart is installed
(tests/cluster/test_chart.py, tests/e2e); here: the trainer image's contract with the
kubelet, SIGTERM to PID 1 on eviction and the termination message, with no operator."""
from __future__ import annotations

import json
import re
import uuid

import pytest

from kube_helpers import (RESTRICTED_CONTAINER, TMP_MOUNT, TMP_VOLUME, terminated_state,
                          create_namespace, unique, wait_for, watch_pod)

pytestmark = pytest.mark.cluster

SPOT = {"nodeSelector": {"phoenix.dev/spot": "true"},
        "tolerations": [{"key": "phoenix.dev/spot", "operator": "Exists", "effect": "NoSchedule"}]}


@pytest.fixture(scope="module")
def ns(core):
    name = create_namespace(core, "images")
    yield name
    core.delete_namespace(name)


def trainer_pod(lab, name: str, bucket: str, *, tmp: bool = True) -> dict:
    """The example trainer with the operator's env contract, as a PhoenixJob pod runs it:
    no command (the image's ENTRYPOINT, python, is PID 1), only args."""
    s3 = lab.s3
    env = {"PHOENIX_JOB_NAME": name, "PHOENIX_JOB_NAMESPACE": "images", "PHOENIX_PHASE": "train",
           "PHOENIX_ATTEMPT": "1", "PHOENIX_CHECKPOINT_URI": f"s3://{bucket}/{name}/train",
           "PHOENIX_GRACE_SECONDS": "20", "AWS_ENDPOINT_URL": s3.url,
           "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
           "AWS_DEFAULT_REGION": s3.region, "OMP_NUM_THREADS": "1"}
    container = {
        "name": "trainer", "image": lab.trainer_image, "imagePullPolicy": "Never",
        "args": ["/app/examples/train_mlp.py", "--steps", "100000", "--step-delay", "0.05",
                 "--checkpoint-every", "10", "--log-every", "5"],
        "env": [{"name": k, "value": v} for k, v in env.items()],
        "securityContext": RESTRICTED_CONTAINER,
        "volumeMounts": [TMP_MOUNT] if tmp else [],
    }
    spec = {"restartPolicy": "Never", "terminationGracePeriodSeconds": 20,
            "containers": [container], **SPOT}
    if tmp:
        spec["volumes"] = [TMP_VOLUME]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


@pytest.mark.slow
def test_trainer_is_pid_1_and_checkpoints_on_eviction_with_termination_message(lab, core, ns):
    bucket = f"img-{uuid.uuid4().hex[:8]}"
    lab.s3.client().create_bucket(Bucket=bucket)
    name = unique("trainer")
    core.create_namespaced_pod(ns, trainer_pod(lab, name, bucket))
    logs = lambda: lab.pod_logs(ns, name)  # noqa: E731
    wait_for(lambda: re.search(r"step \d+ epoch", logs()), 180, 1, "the trainer's first steps",
             diagnose=logs)
    assert re.search(r"starting run \S+ attempt 1 .*pid 1\b", logs()), logs()
    since = core.read_namespaced_pod(name, ns).metadata.resource_version
    lab.evict(ns, name)
    # The evicted pod's object is deleted as soon as its container has ended: its final
    # status is seen on the watch, not by polling.
    pod = watch_pod(core, ns, name, since, terminated_state, 60, "the evicted trainer's exit")
    state = terminated_state(pod)
    assert state.exit_code == 143, state
    message = json.loads(state.message)  # written to /dev/termination-log by the trainer
    assert message["reason"] == "preempted"
    assert message["emergencySaveCompleted"] is True
    assert message["checkpoint"].startswith(f"s3://{bucket}/{name}/train/step-")
    keys = [o["Key"] for o in lab.s3.client().list_objects_v2(
        Bucket=bucket, Prefix=f"{name}/train/").get("Contents", [])]
    step_dir = message["checkpoint"].split(f"s3://{bucket}/", 1)[1]
    assert f"{step_dir}/manifest.json" in keys


def test_trainer_without_writable_tmp_fails_with_a_clear_message(lab, core, ns):
    """A read-only root and no emptyDir at /tmp: the trainer must say what is missing."""
    bucket = f"img-{uuid.uuid4().hex[:8]}"
    lab.s3.client().create_bucket(Bucket=bucket)
    name = unique("notmp")
    core.create_namespaced_pod(ns, trainer_pod(lab, name, bucket, tmp=False))
    pod = wait_for(lambda: (p := core.read_namespaced_pod(name, ns)).status.phase
                   in ("Succeeded", "Failed") and p, 180, 1, "the trainer to give up",
                   diagnose=lambda: lab.pod_logs(ns, name))
    assert pod.status.phase == "Failed"
    assert "PHOENIX_SPOOL_DIR" in lab.pod_logs(ns, name)
