"""A gang on real lab nodes: a PhoenixJob phase of 2 pods x 2 torchrun processes (DDP, gloo),
each pod on a different spot node, the members reaching each other by hostname through the
phase's headless Service. One member evicted, one SIGKILLed, one member's node lost: the job
succeeds, the counts are exact (2 preemptions, 1 failure, each naming the member that caused
it), no member of a dead gang is left running, and the final weights equal an uninterrupted
4-rank run's, tensor for tensor."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from kube_helpers import wait_for
from phoenix_e2e import GROUP, PLURAL, VERSION, phase_status, sample_job, unique
from phoenix_operator import constants as C
from phoenix_operator.podspec import pod_name
from phoenix_trainer.layout import checkpoint_steps
from phoenix_trainer.storage import open_storage
from trainer_procs import free_port, gang_state, tensors_equal

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
STEPS = 300
ARGS = ["--mode", "ddp", f"--steps={STEPS}", "--step-delay=0.1", "--log-every=10"]


def gang_job(e2e, name: str, bucket: str) -> dict:
    body = sample_job(e2e, name, bucket)
    spec = body["spec"]
    container = spec["template"]["spec"]["containers"][0]
    container["command"] = ["python", "-u", "-m", "torch.distributed.run",
                            "/app/examples/train_distributed.py", *ARGS]
    container["env"] += [{"name": "PHOENIX_COLLECTIVE_TIMEOUT_SECONDS", "value": "20"}]
    spec["template"]["spec"]["nodeSelector"] = {"phoenix.dev/spot": "true"}
    spec["template"]["spec"]["tolerations"] = [{"key": "phoenix.dev/spot", "operator": "Exists"}]
    spec["template"]["spec"]["affinity"] = {"podAntiAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {C.LABEL_JOB: name}},
            "topologyKey": "kubernetes.io/hostname"}]}}
    spec["phases"] = [{"name": "train", "replicas": 2, "nprocPerNode": 2}]
    spec["checkpoint"]["intervalSteps"] = 10
    spec["recovery"].update(maxFailures=2, backoff={"initialSeconds": 1, "maxSeconds": 5})
    return body


def test_gang_survives_eviction_kill_and_node_loss(e2e, kube, e2e_bucket, submit_job, tmp_path,
                                                  monkeypatch):
    if "lab" not in e2e.extra:
        pytest.skip("kills a container and loses a node: needs the lab")
    lab = e2e.extra["lab"]
    name = submit_job(gang_job(e2e, unique("gang"), e2e_bucket))
    ns = e2e.namespace
    prefix = f"s3://{e2e_bucket}/{name}/train"
    s3 = e2e.s3.client()

    def job():
        return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)

    def diagnose():
        pods = kube.core.list_namespaced_pod(ns, label_selector=f"{C.LABEL_JOB}={name}").items
        return (f"job status: {job().get('status')}\npods: "
                f"{[(p.metadata.name, p.spec.node_name, p.status.phase) for p in pods]}\n"
                f"operator log:\n{e2e.operator_logs()}")

    def newest_step() -> int:
        out = s3.list_objects_v2(Bucket=e2e_bucket, Prefix=f"{name}/train/")
        steps = [int(k.split("/step-")[1].split("/")[0]) for o in out.get("Contents", ())
                 if (k := o["Key"]).endswith("/manifest.json")]
        return max(steps, default=0)

    def gang_running(attempt: int) -> list:
        pods = [kube.core.read_namespaced_pod(pod_name(name, "train", attempt, i), ns) for i in range(2)]
        return pods if all(p.status.phase == "Running" for p in pods) else []

    def training(attempt: int, beyond: int) -> list:
        """The attempt's gang runs and has committed a checkpoint past ``beyond``."""
        pods = wait_for(lambda: gang_running(attempt), 240, 1, f"attempt {attempt} running",
                        diagnose=diagnose)
        wait_for(lambda: newest_step() > beyond, 240, 1, f"attempt {attempt} checkpointing past {beyond}",
                 diagnose=diagnose)
        return pods

    pods = training(1, 0)
    assert pods[0].spec.node_name != pods[1].spec.node_name
    assert pods[0].spec.hostname == "train-0" and pods[1].spec.subdomain == pods[0].spec.subdomain
    e2e.evict(ns, pods[1].metadata.name)                      # preemption 1, member 1
    pods = training(2, newest_step())
    lab.kill_pod(ns, pods[0].metadata.name, signal.SIGKILL)   # failure 1, member 0
    pods = training(3, newest_step())
    lost = pods[1].spec.node_name
    lab.lose_node(lost, wait=False)                           # preemption 2, member 1's node
    done = wait_for(lambda: (j := job()) and (j.get("status") or {}).get("phase")
                    in ("Succeeded", "Failed") and j, 600, 2, "job finished", diagnose=diagnose)
    assert done["status"]["phase"] == "Succeeded", diagnose()
    ps = phase_status(done)
    assert (ps["preemptions"], ps["failures"], ps["attempts"]) == (2, 1, 4), ps
    assert ps["lastFailure"]["pod"] == pod_name(name, "train", 3, 1), ps["lastFailure"]
    assert ps["lastFailure"]["reason"] == C.R_NODE_LOST, ps["lastFailure"]
    left = [p.metadata.name for p in kube.core.list_namespaced_pod(
        ns, label_selector=f"{C.LABEL_JOB}={name}").items if p.status.phase in ("Running", "Pending")]
    assert left == [], f"members of dead gangs still running: {left}"
    events = [e.message for e in kube.core.list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name}").items]
    assert any("gang member 1 of 2" in m and "preempted" in m for m in events), events
    assert any("gang member 0 of 2" in m and "failed" in m for m in events), events

    # The same 4 ranks uninterrupted, on this machine, as the reference.
    s3_env = {"AWS_ENDPOINT_URL": e2e.s3.local_endpoint, "AWS_ACCESS_KEY_ID": e2e.s3.access_key,
              "AWS_SECRET_ACCESS_KEY": e2e.s3.secret_key, "AWS_DEFAULT_REGION": "us-east-1"}
    for k, v in s3_env.items():
        monkeypatch.setenv(k, v)
    ref = f"s3://{e2e_bucket}/{name}-ref/train"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHOENIX_")}
    env.update(PHOENIX_CHECKPOINT_URI=ref, PHOENIX_ATTEMPT="0", OMP_NUM_THREADS="1",
               PHOENIX_TERMINATION_LOG=str(tmp_path / "ref-termination"))
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4",
                    "--master-addr=127.0.0.1", f"--master-port={free_port()}",
                    str(REPO / "examples" / "train_distributed.py"), *ARGS, "--step-delay=0"],
                   env=env, check=True, timeout=300, capture_output=True)
    assert checkpoint_steps(open_storage(prefix))[-1] == STEPS
    assert tensors_equal(gang_state(prefix, tmp_path, STEPS), gang_state(ref, tmp_path, STEPS))
