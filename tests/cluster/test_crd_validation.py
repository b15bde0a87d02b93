"""The API server itself rejects malformed PhoenixJobs (OpenAPI schema + CEL), with a
message that names the field. No operator needed."""
from __future__ import annotations

import copy
from pathlib import Path
import json

import pytest
import yaml
from kubernetes.client.rest import ApiException

from pxj_helpers import GROUP, PLURAL, VERSION

pytestmark = pytest.mark.cluster

GOOD = {
    "apiVersion": f"{GROUP}/{VERSION}", "kind": "PhoenixJob",
    "metadata": {"name": "bad"},
    "spec": {
        "template": {"spec": {"containers": [{"name": "t", "image": "img"}]}},
        "phases": [{"name": "train"}, {"name": "eval", "dependsOn": ["train"]}],
        "checkpoint": {"uri": "s3://bucket/prefix"},
    },
}


def mutate(fn):
    body = copy.deepcopy(GOOD)
    fn(body)
    return body


def s(body):
    return body["spec"]


MALFORMED = [
    # Issue 22, item 10: the list rules name the phase, not only spec.phases.
    ("duplicate-phase-names", lambda b: s(b)["phases"].append({"name": "train"}),
     'phase names must be unique: "train" appears more than once'),
    ("depends-on-later-phase", lambda b: s(b)["phases"][0].update(dependsOn=["eval"]),
     'phase "train" dependsOn a phase that is not before it'),
    ("depends-on-unknown-phase", lambda b: s(b)["phases"][1].update(dependsOn=["nope"]),
     'phase "eval" dependsOn a phase that is not before it'),
    ("nproc-per-node-without-a-gang", lambda b: s(b)["phases"][0].update(nprocPerNode=2),
     'spec.phases[0].nprocPerNode: Invalid value: phase "train": nprocPerNode applies to a gang'),
    # Issue 22, item 8: a typo in the annotation silently disabled Phoenix.
    ("trainer-container-typo", lambda b: s(b)["template"].update(metadata={"annotations": {
        "phoenix.dev/trainer-container": "trainr"}}),
     'spec.template.metadata.annotations: Invalid value: annotation '
     'phoenix.dev/trainer-container names "trainr", which is not one of '
     'spec.template.spec.containers'),
    ("keep-below-2", lambda b: s(b)["checkpoint"].update(keep=1), "keep"),
    ("negative-max-failures", lambda b: s(b).update(recovery={"maxFailures": -1}), "maxFailures"),
    ("negative-max-preemptions", lambda b: s(b).update(recovery={"maxPreemptions": -2}),
     "maxPreemptions"),
    ("negative-grace", lambda b: s(b).update(recovery={"terminationGracePeriodSeconds": -1}),
     "terminationGracePeriodSeconds"),
    ("backoff-max-below-initial", lambda b: s(b).update(
        recovery={"backoff": {"initialSeconds": 60, "maxSeconds": 10}}), "maxSeconds"),
    ("uri-bad-scheme", lambda b: s(b)["checkpoint"].update(uri="gs://bucket/x"), "uri"),
    ("uri-relative-file", lambda b: s(b)["checkpoint"].update(uri="file://relative/x"), "uri"),
    ("endpoint-not-url", lambda b: s(b)["checkpoint"].update(endpoint="minio:9000"), "endpoint"),
    ("addressing-style-unknown", lambda b: s(b)["checkpoint"].update(addressingStyle="dns"),
     "addressingStyle"),
    ("ca-bundle-without-a-source", lambda b: s(b)["checkpoint"].update(
        caBundle={"key": "ca.crt"}),
     "spec.checkpoint.caBundle needs exactly one of configMap or secret"),
    ("ca-bundle-from-both-sources", lambda b: s(b)["checkpoint"].update(
        caBundle={"configMap": "ca", "secret": "ca"}),
     "spec.checkpoint.caBundle needs exactly one of configMap or secret"),
    ("no-containers", lambda b: s(b)["template"]["spec"].update(containers=[]), "containers"),
    ("template-without-containers", lambda b: s(b)["template"].update(spec={}), "containers"),
    ("no-phases", lambda b: s(b).update(phases=[]), "phases"),
    ("phase-name-not-dns", lambda b: s(b)["phases"][0].update(name="Train_1"), "name"),
    ("reserved-env", lambda b: s(b)["phases"][0].update(
        env=[{"name": "PHOENIX_RESUME_FROM", "value": "x"}]), "env"),
    ("restart-policy-always", lambda b: s(b)["template"]["spec"].update(restartPolicy="Always"),
     "restartPolicy"),
    ("replicas-0", lambda b: s(b)["phases"][0].update(replicas=0), "replicas"),
    ("gang-timeout-too-short", lambda b: s(b).setdefault("recovery", {}).update(gangScheduleTimeoutSeconds=1), "gangScheduleTimeoutSeconds"),
    ("missing-checkpoint", lambda b: s(b).pop("checkpoint"), "checkpoint"),
    ("interval-steps-zero", lambda b: s(b)["checkpoint"].update(intervalSteps=0), "intervalSteps"),
    ("name-too-long", lambda b: b["metadata"].update(name="x" * 64), "metadata.name"),
]


@pytest.fixture(scope="module")
def custom_api(lab, crd):
    from kubernetes import client

    with lab.api_client() as api:
        yield client.CustomObjectsApi(api)


def test_good_job_is_accepted_with_defaults(custom_api):
    out = custom_api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL,
                                                     GOOD, dry_run="All")
    assert out["spec"]["checkpoint"]["keep"] == 3
    assert out["spec"]["checkpoint"]["addressingStyle"] == "auto"
    assert out["spec"]["recovery"]["maxFailures"] == 3
    assert out["spec"]["recovery"]["backoff"] == {"initialSeconds": 10, "maxSeconds": 300}
    assert out["spec"]["phases"][0]["independent"] is False
    assert out["spec"]["suspend"] is False


@pytest.mark.parametrize("source", ["configMap", "secret"])
def test_a_ca_bundle_from_either_source_is_accepted_with_its_key_defaulted(custom_api, source):
    body = mutate(lambda b: s(b)["checkpoint"].update(caBundle={source: "internal-ca"}))
    out = custom_api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body,
                                                     dry_run="All")
    assert out["spec"]["checkpoint"]["caBundle"] == {source: "internal-ca", "key": "ca.crt"}


@pytest.mark.parametrize("fn,field", [(m[1], m[2]) for m in MALFORMED],
                         ids=[m[0] for m in MALFORMED])
def test_malformed_job_is_rejected_naming_the_field(custom_api, fn, field):
    with pytest.raises(ApiException) as err:
        custom_api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL,
                                                   mutate(fn), dry_run="All")
    assert err.value.status == 422, err.value.body
    message = json.loads(err.value.body)["message"]
    assert field in message, message


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "examples")
                                        .glob("phoenixjob-*.yaml")), ids=lambda p: p.name)
def test_examples_are_accepted(custom_api, path):
    body = yaml.safe_load(path.read_text())
    custom_api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body,
                                               dry_run="All")


def test_kubectl_explain_teaches_the_fields(lab, crd):
    text = lab.kubectl("explain", "phoenixjobs.spec.recovery.maxFailures").stdout
    assert "Preemptions never" in text or "failures" in text.lower()
    text = lab.kubectl("explain", "pxj.status.phases.lastFailure").stdout
    assert "exitCode" in text and "reason" in text


def test_printer_columns(lab, crd):
    out = lab.kubectl("get", "crd", "phoenixjobs.phoenix.dev", "-o",
                      "jsonpath={.spec.versions[0].additionalPrinterColumns[*].name}").stdout
    assert out.split(" ") == ["Status", "Phase", "Step", "Preemptions", "Failures",
                              "Checkpoint", "age", "Last", "step", "Age"]  # names with a space


# --- transition rules (oldSelf): what a running job may not change -------------------------
STARTED = "spec.phases: Forbidden: spec.phases: a phase that has started"
SHAPE = "spec.phases: Forbidden: spec.phases: replicas and nprocPerNode of a phase that has started"
WHERE = ("spec.checkpoint: Forbidden: spec.checkpoint.endpoint, region, credentialsSecret and "
         "addressingStyle are immutable")
IMMUTABLE = [
    ("checkpoint-uri", lambda b: s(b)["checkpoint"].update(uri="s3://bucket/elsewhere"),
     "spec.checkpoint.uri: Forbidden: spec.checkpoint.uri is immutable"),
    # Issue 22, item 9: the shape of a started phase, and where its checkpoints are.
    ("replicas-of-started-phase", lambda b: s(b)["phases"][0].update(replicas=2), SHAPE),
    ("endpoint", lambda b: s(b)["checkpoint"].update(endpoint="http://elsewhere:9000"), WHERE),
    ("region", lambda b: s(b)["checkpoint"].update(region="eu-west-1"), WHERE),
    ("credentials-secret", lambda b: s(b)["checkpoint"].update(credentialsSecret="other"), WHERE),
    ("addressing-style", lambda b: s(b)["checkpoint"].update(addressingStyle="virtual"), WHERE),
    ("rename-started-phase", lambda b: s(b).update(
        phases=[{"name": "pretrain"}, {"name": "eval", "dependsOn": ["pretrain"]}]), STARTED),
    ("remove-started-phase", lambda b: s(b).update(phases=[{"name": "eval"}]), STARTED),
    ("move-started-phase", lambda b: s(b).update(
        phases=[{"name": "warmup"}, {"name": "train"}, {"name": "eval", "dependsOn": ["train"]}]),
     STARTED),
]
ALLOWED = [
    ("rename-unstarted-phase", lambda b: s(b)["phases"][1].update(name="evaluate")),
    ("gang-shape-of-unstarted-phase", lambda b: s(b)["phases"][1].update(replicas=2,
                                                                          nprocPerNode=2)),
    ("trainer-container-named", lambda b: s(b)["template"].update(metadata={"annotations": {
        "phoenix.dev/trainer-container": "t"}})),
    ("append-phase", lambda b: s(b)["phases"].append({"name": "export"})),
    ("other-fields", lambda b: s(b).update(recovery={"maxFailures": 7}, suspend=False)),
    # written out as the default it already had: no change
    ("addressing-style-auto-spelled-out",
     lambda b: s(b)["checkpoint"].update(addressingStyle="auto")),
]


@pytest.fixture(scope="module")
def started_job(custom_api):
    """A job whose train phase has started (attempts 1, as the operator writes it); suspended
    and outside the operator's namespaces, so nothing acts on it."""
    body = copy.deepcopy(GOOD)
    body["metadata"] = {"name": "immutable"}
    body["spec"]["suspend"] = True
    custom_api.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, body)
    custom_api.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "immutable",
        {"status": {"phases": [{"name": "train", "state": "Running", "attempts": 1},
                               {"name": "eval", "state": "Pending", "attempts": 0}]}})
    yield custom_api.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "immutable")
    custom_api.delete_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "immutable")


def _update(custom_api, job, fn):
    body = copy.deepcopy(job)
    fn(body)
    return custom_api.replace_namespaced_custom_object(GROUP, VERSION, "default", PLURAL,
                                                       "immutable", body, dry_run="All")


@pytest.mark.parametrize("fn,text", [(m[1], m[2]) for m in IMMUTABLE],
                         ids=[m[0] for m in IMMUTABLE])
def test_identity_fields_of_a_started_job_are_immutable(custom_api, started_job, fn, text):
    with pytest.raises(ApiException) as err:
        _update(custom_api, started_job, fn)
    assert err.value.status == 422, err.value.body
    message = " ".join(json.loads(err.value.body)["message"].split())
    assert text in message, message


@pytest.mark.parametrize("fn", [a[1] for a in ALLOWED], ids=[a[0] for a in ALLOWED])
def test_what_a_started_job_may_still_change(custom_api, started_job, fn):
    _update(custom_api, started_job, fn)


def test_status_writes_pass_the_transition_rule(custom_api, started_job):
    """The rule reads the status; the operator's own status writes (spec untouched) are never
    refused by it."""
    custom_api.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "immutable",
        {"status": {"phases": [{"name": "train", "state": "Running", "attempts": 2},
                               {"name": "eval", "state": "Pending", "attempts": 0}]}},
        dry_run="All")


def test_resume_exact_verdict_is_kept_by_the_schema(custom_api, started_job, lab):
    """The trainer's verdict in status.phases[] and the ResumeExact condition are not pruned."""
    why = "sampler Opaque has neither a generator nor set_epoch()"
    custom_api.patch_namespaced_custom_object_status(
        GROUP, VERSION, "default", PLURAL, "immutable",
        {"status": {"phases": [{"name": "train", "state": "Running", "attempts": 1,
                                "resumeExact": False, "resumeExactReason": why},
                               {"name": "eval", "state": "Pending", "attempts": 0}],
                    "conditions": [{"type": "ResumeExact", "status": "False", "reason": "ResumeNotExact",
                                    "message": f"phase train: {why}",
                                    "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})
    got = custom_api.get_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, "immutable")
    assert got["status"]["phases"][0]["resumeExact"] is False
    assert got["status"]["phases"][0]["resumeExactReason"] == why
    assert got["status"]["conditions"][0]["reason"] == "ResumeNotExact"
    assert "resumeExactReason" in lab.kubectl("explain", "pxj.status.phases").stdout
