"""A gang on real lab nodes: a PhoenixJob phase of 2 pods x 2 torchrun processes (DDP, gloo),
each pod on a different spot node, the members reaching each other by hostname through the
phase's headless Service. One member evicted, one SIGKILLed, one member's node lost: the job
succeeds, the counts are exact (2 preemptions, 1 failure, each naming the member that caused
it), no member of a dead gang is left running, every rank trained on exactly the samples of
the undisturbed run (the same gang on the same nodes), and the final weights equal its, tensor
for tensor."""
from __future__ import annotations

import json
import signal

import pytest

from kube_helpers import wait_for
from phoenix_e2e import GROUP, PLURAL, VERSION, phase_status, sample_job, unique
from phoenix_operator import constants as C
from phoenix_operator.podspec import pod_name
from phoenix_trainer.core.layout import checkpoint_steps
from phoenix_trainer.core.storage import open_storage
from trainer_procs import gang_state, tensors_equal

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
STEPS = 300
ARGS = ["--mode", "ddp", f"--steps={STEPS}", "--step-delay=0.1", "--log-every=10"]


def gang_job(e2e, name: str, bucket: str, *extra: str) -> dict:
    body = sample_job(e2e, name, bucket)
    spec = body["spec"]
    container = spec["template"]["spec"]["containers"][0]
    container["command"] = ["python", "-u", "-m", "torch.distributed.run",
                            "/app/examples/train_distributed.py", *ARGS, *extra]
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
    ns = e2e.namespace

    def finished(job_name: str, timeout: float) -> dict:
        return wait_for(lambda: (j := kube.custom.get_namespaced_custom_object(
            GROUP, VERSION, ns, PLURAL, job_name)) and (j.get("status") or {}).get("phase")
            in ("Succeeded", "Failed") and j, timeout, 2, f"{job_name} finished")

    # The reference: the same gang, undisturbed (no step delay: it does not change the math).
    ref_name = submit_job(gang_job(e2e, unique("gang-ref"), e2e_bucket, "--step-delay=0"))
    assert finished(ref_name, 300)["status"]["phase"] == "Succeeded"
    name = submit_job(gang_job(e2e, unique("gang"), e2e_bucket))
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
    done = finished(name, 600)
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

    monkeypatch.setenv("AWS_ENDPOINT_URL", e2e.s3.local_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", e2e.s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", e2e.s3.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    ref = f"s3://{e2e_bucket}/{ref_name}/train"
    assert checkpoint_steps(open_storage(prefix))[-1] == STEPS
    got, want = gang_state(prefix, tmp_path, STEPS), gang_state(ref, tmp_path, STEPS)
    seen = [json.loads(open_storage(p).get_bytes(f"step-{STEPS:010d}/rank0-data.json"))
            for p in (prefix, ref)]
    assert seen[0] == seen[1] == {"samplesSeen": STEPS * 32, "worldSize": 4}, seen
    worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()
                for a, b in zip(got["model"].values(), want["model"].values()))
    assert tensors_equal(got, want), f"final weights differ (largest relative difference {worst:.2e})"


def standby_gang_job(e2e, name: str, bucket: str, *extra: str, standby: bool) -> dict:
    """2 pods x 1 process; members may share nodes (the lab has two spot nodes: an active
    gang and a standby gang of two pods each must fit)."""
    body = gang_job(e2e, name, bucket, *extra)
    spec = body["spec"]
    spec["template"]["spec"].pop("affinity")
    spec["phases"] = [{"name": "train", "replicas": 2, "nprocPerNode": 1}]
    spec["recovery"]["standby"] = standby
    return body


def test_standby_gang_takes_over_when_an_active_member_is_evicted(e2e, kube, e2e_bucket,
                                                                  submit_job, tmp_path,
                                                                  monkeypatch):
    """recovery.standby on a gang: a standby gang (hostnames of its own under the same
    Service) gets ready beside the active gang; one active member evicted -> the standby gang
    is promoted as a unit (no new pod created for the attempt) and finishes with the weights
    of an undisturbed gang, tensor for tensor."""
    if "lab" not in e2e.extra:
        pytest.skip("needs the lab's spot nodes")
    ns = e2e.namespace

    def get(job_name: str) -> dict:
        return kube.custom.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, job_name)

    def finished(job_name: str, timeout: float) -> dict:
        return wait_for(lambda: (j := get(job_name)) and (j.get("status") or {}).get("phase")
                        in ("Succeeded", "Failed") and j, timeout, 2, f"{job_name} finished",
                        diagnose=lambda: diagnose(job_name))

    def diagnose(job_name: str) -> str:
        pods = kube.core.list_namespaced_pod(ns, label_selector=f"{C.LABEL_JOB}={job_name}").items
        return (f"job status: {get(job_name).get('status')}\npods: "
                f"{[(p.metadata.name, p.spec.node_name, p.status.phase) for p in pods]}\n"
                f"operator log:\n{e2e.operator_logs()}")

    ref_name = submit_job(standby_gang_job(e2e, unique("sbgang-ref"), e2e_bucket,
                                           "--step-delay=0", standby=False))
    assert finished(ref_name, 300)["status"]["phase"] == "Succeeded"
    name = submit_job(standby_gang_job(e2e, unique("sbgang"), e2e_bucket, "--step-delay=0.4",
                                       standby=True))

    def standby_ready() -> dict | None:
        sb = (phase_status(get(name)) or {}).get("standby") or {}
        return sb if sb.get("ready") else None

    sb = wait_for(standby_ready, 300, 1, "standby gang ready", diagnose=lambda: diagnose(name))
    assert (sb["attempt"], sb["members"], sb["readyMembers"]) == (2, 2, 2), sb
    active = [kube.core.read_namespaced_pod(pod_name(name, "train", 1, i), ns) for i in range(2)]
    waiting = [kube.core.read_namespaced_pod(pod_name(name, "train", 2, i), ns) for i in range(2)]
    assert [p.spec.hostname for p in active] == ["train-0", "train-1"]
    assert [p.spec.hostname for p in waiting] == ["train-2-0", "train-2-1"]
    assert {p.spec.subdomain for p in active + waiting} == {active[0].spec.subdomain}
    envs = [{e.name: e.value for e in p.spec.containers[0].env} for p in waiting]
    assert all(e["PET_MASTER_ADDR"].startswith("train-2-0.") and e["PHOENIX_ROLE"] == "standby"
               for e in envs), envs
    assert phase_status(get(name))["attempts"] == 1

    e2e.evict(ns, active[1].metadata.name)  # the whole active gang stops; the standby gang is it
    wait_for(lambda: phase_status(get(name)).get("promotions") == 1, 120, 1, "promoted",
             diagnose=lambda: diagnose(name))
    done = finished(name, 600)
    assert done["status"]["phase"] == "Succeeded", diagnose(name)
    ps = phase_status(done)
    assert (ps["preemptions"], ps["failures"], ps["attempts"]) == (1, 0, 2), ps
    assert ps["lastFailure"]["pod"] == pod_name(name, "train", 1, 1), ps["lastFailure"]
    events = [e.message for e in kube.core.list_namespaced_event(
        ns, field_selector=f"involvedObject.name={name}").items]
    assert any("standby gang of 2 pods" in m and "takes over" in m for m in events), events

    monkeypatch.setenv("AWS_ENDPOINT_URL", e2e.s3.local_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", e2e.s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", e2e.s3.secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    prefix, ref = (f"s3://{e2e_bucket}/{n}/train" for n in (name, ref_name))
    got, want = gang_state(prefix, tmp_path, STEPS), gang_state(ref, tmp_path, STEPS)
    seen = [json.loads(open_storage(p).get_bytes(f"step-{STEPS:010d}/rank0-data.json"))
            for p in (prefix, ref)]
    assert seen[0] == seen[1] == {"samplesSeen": STEPS * 32, "worldSize": 2}, seen
    assert tensors_equal(got, want), "final weights differ from the undisturbed gang's"
