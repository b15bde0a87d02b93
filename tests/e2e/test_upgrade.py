"""The upgrade path of docs/install.md section 7 on the lab: the previous release's CRD and
chart (operator image built from that revision's Dockerfile) run a job; while it trains, the
CRD is applied and the chart upgraded to this checkout's; the new operator then recovers a
preemption of the pod the old one created, and the job finishes with final weights equal,
tensor for tensor, to an uninterrupted reference run's.

"The previous release" is a git revision named in tests/e2e/upgrade-from (no release is
published yet); its tree comes from `git archive`. Both operators drive this checkout's
trainer image (an operator upgrade leaves running trainer pods alone, and a second trainer
image is 6 GB), which holds only while the two revisions share the trainer contract;
upgrade-from says why its revision does.

Not in `make test`: it builds an operator image and rolls the operator (minutes).
`make test-upgrade` runs it (PHOENIX_UPGRADE_E2E=1). Lab only: it builds with the lab's
dockerd and imports the image into the nodes. It installs its own release in its own
namespaces, watching only its job namespace, so another release in the session (the e2e
suite's) never acts on its jobs; the CRD is cluster-wide, so while it runs every release sees
the previous revision's schema.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from kube_helpers import wait_for
from phoenix_e2e import (CREDENTIALS_SECRET, DEFAULT_TRAINER_COMMAND, GROUP, PLURAL, VERSION,
                         E2ETarget, LabRelease, S3Target, phase_status, sample_job, unique,
                         upgrade_from)
from phoenix_operator import constants as C
from phoenix_operator.podspec import pod_name

pytestmark = [
    pytest.mark.e2e, pytest.mark.slow,
    # A lab started for it, an image build, two rollouts and a 1000-step job.
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.environ.get("PHOENIX_UPGRADE_E2E", "") not in ("1", "true"),
                       reason="builds the previous revision's operator image and upgrades a "
                              "release while a job runs (minutes): `make test-upgrade` "
                              "(PHOENIX_UPGRADE_E2E=1)"),
]

REPO = Path(__file__).resolve().parents[2]
CHART = Path("charts") / "phoenix"
CRD = CHART / "crds" / "phoenixjobs.yaml"
CRD_NAME = f"{PLURAL}.{GROUP}"
PREVIOUS_IMAGE = "phoenix-operator-upgrade-from"  # its own name: the lab's builds prune phoenix-operator's tags
NAMESPACE = "phoenix-upgrade"
RELEASE = "phoenix-upgrade"
RELEASE_NAMESPACE = "phoenix-upgrade-system"
STEPS = 1000


def _checkout(commit: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.Popen(["git", "-C", str(REPO), "archive", "--format=tar", commit],
                               stdout=subprocess.PIPE)
    subprocess.run(["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True)
    archive.stdout.close()
    assert archive.wait() == 0, f"git archive {commit} failed"
    return into


def _build_and_import(lab, tree: Path, commit: str) -> str:
    """The previous revision's operator image, built from its own Dockerfile on the lab's
    Python base (BuildKit's cache makes a rebuild of the same tree seconds), imported into
    every node's containerd as the lab does with its own images."""
    from phoenix_lab import images, nodes

    base = images.ensure_base_image()
    ref = f"{PREVIOUS_IMAGE}:{commit[:12]}"
    images.docker("build", "--network", "host", "--file", str(tree / "Dockerfile"),
                  "--build-arg", f"PYTHON_IMAGE={base}", "--tag", ref, str(tree), timeout=900)
    tar = images.save_image(ref)
    try:
        for node in lab.nodes():
            nodes.ctr(node.socket, "images", "import", "--snapshotter", "overlayfs", str(tar))
    finally:
        tar.unlink(missing_ok=True)
        tar.with_name(tar.name + ".id").unlink(missing_ok=True)
    return ref


class Release:
    """This test's chart release, installed and upgraded with helm and kubectl as
    docs/install.md tells a user, with the lab's values (phoenix_lab.install) on top of the
    chart's ci/lab-values.yaml, watching NAMESPACE only."""

    def __init__(self, lab, values_dir: Path) -> None:
        self.lab, self.values_dir = lab, values_dir
        self.handle = LabRelease(lab, RELEASE, RELEASE_NAMESPACE)

    def _values(self, image: str) -> Path:
        from phoenix_lab.install import lab_values

        repository, tag = image.rsplit(":", 1)
        values = {**lab_values(self.lab), "image": {"repository": repository, "tag": tag},
                  "rbac": {"scope": "namespaces", "namespaces": [NAMESPACE]}}
        path = self.values_dir / f"values-{tag}.yaml"
        path.write_text(yaml.safe_dump(values))
        return path

    def install(self, tree: Path, image: str) -> None:
        self.lab.helm("install", RELEASE, str(tree / CHART), "-n", RELEASE_NAMESPACE,
                      "--create-namespace", "-f", str(tree / CHART / "ci" / "lab-values.yaml"),
                      "-f", str(self._values(image)))

    def upgrade(self, tree: Path, image: str) -> None:
        self.lab.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(tree / CRD))
        self.lab.helm("upgrade", RELEASE, str(tree / CHART), "-n", RELEASE_NAMESPACE,
                      "-f", str(tree / CHART / "ci" / "lab-values.yaml"),
                      "-f", str(self._values(image)))
        self.lab.kubectl("-n", RELEASE_NAMESPACE, "rollout", "status",
                         f"deployment/{self.handle.operators.deployment}", "--timeout=240s",
                         timeout=260)

    def serving(self, image: str) -> dict:
        """Wait until every replica runs `image` and is Ready and one of them leads; the
        leader's pod."""
        def ready():
            pods = self.handle.ready() and self.handle.operators.pods()
            leader = pods and self.handle.operators.leader()
            return leader if pods and leader and all(
                p["spec"]["containers"][0]["image"] == image for p in pods) else None

        from phoenix_lab.procs import LabError

        return wait_for(ready, 240, 1, f"release {RELEASE}: every operator replica on {image}, "
                        "Ready, one leading", diagnose=self.handle.describe, retry_on=(LabError,))

    def uninstall(self) -> None:
        self.handle.uninstall()


def _schema(crd: dict) -> list:
    return [(v["name"], v.get("schema")) for v in crd["spec"]["versions"]]


def _cluster_crd(lab) -> dict | None:
    got = lab.kubectl("get", "crd", CRD_NAME, "-o", "json", check=False)
    return json.loads(got.stdout) if got.returncode == 0 else None


@pytest.fixture(scope="module")
def upgrade_lab(tmp_path_factory):
    if os.environ.get("PHOENIX_E2E_KUBECONFIG"):
        pytest.skip("builds the previous operator image with the lab's dockerd and imports it "
                    "into the lab's nodes: lab only")
    from phoenix_lab import paths

    for name in ("kubectl", "helm", "kube-apiserver", "kubelet", "versitygw"):
        try:
            paths.binary(name)
        except FileNotFoundError as e:
            pytest.skip(f"the lab cannot start: {e}")
    commit = upgrade_from(REPO)
    assert commit, "tests/e2e/upgrade-from names a commit this checkout's history lacks"
    tmp = tmp_path_factory.mktemp("upgrade")
    return commit, _checkout(commit, tmp / "previous"), tmp


def test_upgrade_while_a_job_runs(upgrade_lab, request):
    commit, previous, tmp = upgrade_lab
    lab = request.getfixturevalue("lab")
    old_image = _build_and_import(lab, previous, commit)
    new_image = lab.operator_image
    assert old_image != new_image

    # The previous release, as a user installed it: Helm creates the CRD from the chart's
    # crds/ when none exists. A lab where another release already made it gets the previous
    # revision's put back in place (an update by another manager, as Helm's create is).
    if _cluster_crd(lab) is not None:
        lab.kubectl("replace", "-f", str(previous / CRD))
    # rbac.scope=namespaces: the watched namespace exists before the install (section 3).
    lab.kubectl("create", "namespace", NAMESPACE, check=False)
    release = Release(lab, tmp)
    release.install(previous, old_image)
    old_crd = yaml.safe_load((previous / CRD).read_text())
    assert _schema(_cluster_crd(lab)) == _schema(old_crd), "the previous CRD is not in place"
    try:
        _run_job_through_the_upgrade(lab, release, commit, old_image, new_image)
    finally:
        release.uninstall()
        lab.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
        # The cluster keeps this checkout's CRD whatever happened above.
        lab.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(REPO / CRD), check=False)


def _run_job_through_the_upgrade(lab, release: Release, commit: str, old_image: str,
                                 new_image: str) -> None:
    from kubernetes import client

    from phoenix_lab import samples
    from phoenix_trainer.core.handshake import read_fence
    from phoenix_trainer.core.layout import list_checkpoints

    old_leader = release.serving(old_image)
    lab.kubectl("apply", "-f", "-", input=json.dumps(samples.credentials_secret(
        NAMESPACE, lab.s3, CREDENTIALS_SECRET)))
    target = E2ETarget(
        kubeconfig=lab.kubeconfig, namespace=NAMESPACE, operator_namespace=RELEASE_NAMESPACE,
        operator_release=RELEASE, s3=S3Target(lab.s3.url, lab.s3.url, lab.s3.access_key,
                                              lab.s3.secret_key),
        trainer_image=lab.trainer_image, image_pull_policy="Never",
        trainer_command=DEFAULT_TRAINER_COMMAND.split(), extra={"lab": lab})
    bucket = f"upgrade-{unique('b')}"
    target.s3.client().create_bucket(Bucket=bucket)
    # Same config, same weights: only the pace differs. The reference runs where the
    # operators do (on-demand), the job on the spot nodes, slow enough to outlast the upgrade.
    ref_body = sample_job(target, unique("upgrade-ref"), bucket, steps=STEPS, step_delay=0.0,
                          checkpoint_every=50)
    body = sample_job(target, unique("upgrade"), bucket, steps=STEPS, step_delay=0.15,
                      checkpoint_every=50)
    spec = body["spec"]["template"]["spec"]
    spec["nodeSelector"] = {"phoenix.dev/spot": "true"}
    spec["tolerations"] = [{"key": "phoenix.dev/spot", "operator": "Exists", "effect": "NoSchedule"}]

    with lab.api_client() as api:
        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        for b in (ref_body, body):
            custom.create_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, b)
        ref, name = ref_body["metadata"]["name"], body["metadata"]["name"]

        def job(n=name):
            return custom.get_namespaced_custom_object(GROUP, VERSION, NAMESPACE, PLURAL, n)

        def diagnose():
            return (f"job status: {job().get('status')}\nreference status: "
                    f"{job(ref).get('status')}\noperators:\n{release.handle.describe()}")

        def pod(n):
            got = core.list_namespaced_pod(NAMESPACE, field_selector=f"metadata.name={n}").items
            return got[0] if got else None

        def finished(n, timeout):
            return wait_for(lambda: (j := job(n)) and (j.get("status") or {}).get("phase")
                            in ("Succeeded", "Failed") and j, timeout, 2, f"{n} finished",
                            diagnose=diagnose)

        first = pod_name(name, "train", 1)
        storage = samples.open_phase_storage(f"s3://{bucket}/{name}/train", lab.s3)
        wait_for(lambda: (p := pod(first)) and p.status.phase == "Running", 240, 0.5,
                 f"{first} running (created by the previous operator)", diagnose=diagnose)
        wait_for(lambda: list_checkpoints(storage), 240, 0.5, "a first checkpoint", diagnose=diagnose)
        first_uid = pod(first).metadata.uid

        # docs/install.md section 7: the CRD first, then the chart; the new operator leads.
        t0 = time.monotonic()
        release.upgrade(REPO, new_image)
        new_leader = release.serving(new_image)
        upgrade_seconds = time.monotonic() - t0
        assert new_leader["metadata"]["name"] != old_leader["metadata"]["name"]
        assert _schema(_cluster_crd(lab)) == _schema(yaml.safe_load((REPO / CRD).read_text())), \
            "the upgrade left the previous CRD in place"

        # The running trainer pod went through the upgrade untouched, mid-run.
        running = pod(first)
        assert running is not None and running.metadata.uid == first_uid \
            and running.status.phase == "Running", (running and running.status, diagnose())
        st = phase_status(job())
        assert (st.get("attempts"), st.get("preemptions", 0), st.get("failures", 0)) == (1, 0, 0), st
        last = (st.get("lastCheckpoint") or {}).get("step", 0)
        assert last < STEPS, f"the job ended before the preemption ({st}); slow it down"

        # A preemption after the upgrade: the new operator recovers a job the old one created.
        target.evict(NAMESPACE, first)
        done = finished(name, 600)
        assert done["status"]["phase"] == "Succeeded", diagnose()
        st = phase_status(done)
        assert (st["attempts"], st["preemptions"], st["failures"]) == (2, 1, 0), st
        second = pod(pod_name(name, "train", 2))
        assert second is not None, f"no attempt-2 pod\n{diagnose()}"
        # Created by the new leader, after it took over; resumed from a validated checkpoint.
        assert second.metadata.creation_timestamp >= _created(new_leader), \
            (second.metadata.creation_timestamp, new_leader["metadata"])
        env = {e.name: e.value for e in second.spec.containers[0].env or [] if e.value}
        assert env.get("PHOENIX_RESUME_FROM", "").startswith(f"s3://{bucket}/{name}/train/"), env
        # No duplicate: the job's pods are its two attempts, nothing else.
        names = {p.metadata.name for p in core.list_namespaced_pod(
            NAMESPACE, label_selector=f"{C.LABEL_JOB}={name}").items}
        assert names <= {first, second.metadata.name}, names
        # One writer per checkpoint: attempt 1 published nothing past where attempt 2 resumed.
        resumed_at = samples.attempt_starts(storage)[2][0]
        for c in list_checkpoints(storage):
            a = c.manifest.attempt
            assert (a == 1 and c.step <= resumed_at) or (a == 2 and c.step >= resumed_at), c
        assert read_fence(storage).attempt == 2

        ref_done = finished(ref, 600)
        assert ref_done["status"]["phase"] == "Succeeded", diagnose()
        ref_st = phase_status(ref_done)
        assert (ref_st["attempts"], ref_st["preemptions"], ref_st["failures"]) == (1, 0, 0), ref_st
        ref_storage = samples.open_phase_storage(f"s3://{bucket}/{ref}/train", lab.s3)
        same, uri = samples.final_weights_equal(storage, ref_storage)
        assert same, f"final weights at {uri} differ from the uninterrupted run's"
        print(f"upgrade from {commit[:12]}: CRD + helm upgrade + new leader in "
              f"{upgrade_seconds:.0f}s; resumed at step {resumed_at}")


def _created(obj: dict):
    from datetime import datetime

    return datetime.fromisoformat(obj["metadata"]["creationTimestamp"].replace("Z", "+00:00"))
