"""The bring-your-own-loop examples as users run them: examples/phoenixjob-lightning.yaml,
phoenixjob-transformers.yaml and phoenixjob-custom-loop.yaml (a plain loop on Session),
pointed at this cluster's image, S3 and namespace, and shortened, run side by side in the
real trainer image, each evicted once after its first checkpoint, and all succeed with the
replacement resuming from that checkpoint."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kube_helpers import wait_for
from phoenix_operator.podspec import pod_name
from phoenix_e2e import CREDENTIALS_SECRET, GROUP, PLURAL, VERSION, phase_status, unique

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
# Lightning's example sleeps per forward (2 per step), the others per step.
STEP_DELAY = {"lightning": "0.05", "transformers": "0.1", "custom-loop": "0.1"}


def example_job(e2e, framework: str, bucket: str) -> dict:
    body = yaml.safe_load((EXAMPLES / f"phoenixjob-{framework}.yaml").read_text())
    name = body["metadata"]["name"] = unique(framework)
    trainer = body["spec"]["template"]["spec"]["containers"][0]
    trainer.update(image=e2e.trainer_image, imagePullPolicy=e2e.image_pull_policy)
    trainer["resources"]["requests"] = {"cpu": "100m", "memory": "512Mi"}
    if "lab" not in e2e.extra:  # a cluster without the lab's GPU spot nodes (kind): run anywhere
        pod = body["spec"]["template"]["spec"]
        pod.pop("nodeSelector"), pod.pop("tolerations"), trainer["resources"].pop("limits")
    trainer.setdefault("env", []).append({"name": "OMP_NUM_THREADS", "value": "1"})
    phase = body["spec"]["phases"][0]
    phase["args"] = [phase["args"][0], "--steps", "120", "--step-delay", STEP_DELAY[framework],
                     "--workers", "1"]
    body["spec"]["checkpoint"].update(uri=f"s3://{bucket}/{name}", endpoint=e2e.s3.endpoint,
                                      credentialsSecret=CREDENTIALS_SECRET, intervalSteps=20)
    body["spec"]["recovery"].update(terminationGracePeriodSeconds=20, maxFailures=1)
    return body


# full: the framework examples on the lab (make test kills and resumes them in tests/storage)
@pytest.mark.full
def test_framework_examples_survive_an_eviction(e2e, kube, e2e_bucket, submit_job):
    names = [submit_job(example_job(e2e, fw, e2e_bucket)) for fw in STEP_DELAY]

    def job(name):
        return kube.custom.get_namespaced_custom_object(GROUP, VERSION, e2e.namespace, PLURAL, name)

    def diagnose():
        return "\n".join(f"{n}: {job(n).get('status')}" for n in names) + \
            f"\noperator log:\n{e2e.operator_logs()}"

    def checkpointed(name):
        out = e2e.s3.client().list_objects_v2(Bucket=e2e_bucket, Prefix=f"{name}/train/step-")
        return any(o["Key"].endswith("/manifest.json") for o in out.get("Contents", ()))

    pending = set(names)
    while pending:  # evict each job's first pod once it has committed a checkpoint
        done = wait_for(lambda: [n for n in pending if checkpointed(n)], 300, 1,
                        f"a first checkpoint of {sorted(pending)}", diagnose=diagnose)
        for name in done:
            e2e.evict(e2e.namespace, pod_name(name, "train", 1))
            pending.discard(name)

    for name in names:
        final = wait_for(lambda: (j := job(name))
                         and (j.get("status") or {}).get("phase") in ("Succeeded", "Failed") and j,
                         420, 2, f"{name} finished", diagnose=diagnose)
        ps = phase_status(final)
        assert final["status"]["phase"] == "Succeeded", diagnose()
        assert ps["preemptions"] == 1 and ps["failures"] == 0 and ps["attempts"] == 2, ps
        assert ps["resumeExact"] is True, ps
        second = kube.core.read_namespaced_pod(pod_name(name, "train", 2), e2e.namespace)
        env = {e.name: e.value for e in second.spec.containers[0].env or [] if e.value}
        assert env.get("PHOENIX_RESUME_FROM", "").startswith(f"s3://{e2e_bucket}/{name}/train/step-")
        assert ps["lastCheckpoint"]["step"] == 120, ps
