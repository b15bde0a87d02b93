"""The order in which a plan is applied is what makes it safe: intent (status) before the
pod, the pod's uid right after, nothing more if the API refuses the pod. Fake Kube, no
cluster."""
import asyncio
import json

import pytest
from kubernetes.client.rest import ApiException

from phoenix_operator.workqueue import Backoff
from phoenix_trainer.core.storage import Credentials
from phoenix_operator.node_health import NodeHealth
from phoenix_operator.config import OperatorConfig
from phoenix_operator.decide import decide
from phoenix_operator.kube import EventCache, ForeignPod, Kube
from phoenix_operator.leader import Leadership, NotLeader
from phoenix_operator.reconcile import Reconciler, RetryLater

from opfacts import at, job, listing, phase_status, pod, with_status

pytestmark = pytest.mark.unit


class FakeKube:
    def __init__(self, create_error: int | None = None, patch_error: int | None = None):
        self.calls = []
        self.create_error = create_error
        self.patch_error = patch_error

    def patch_status(self, job, status):
        self.calls.append(("patch", [(p["attempts"], p.get("podUID")) for p in status["phases"]]))
        if self.patch_error:
            raise ApiException(status=self.patch_error, reason="Conflict")
        return {**job, "metadata": {**job["metadata"], "resourceVersion": "2"}}

    def create_pod(self, namespace, manifest):
        self.calls.append(("create", manifest["metadata"]["name"]))
        if self.create_error:
            raise ApiException(status=self.create_error, reason="Forbidden")
        return "uid-new"

    def delete_pod(self, namespace, name, grace):
        self.calls.append(("delete", name, grace))

    def post_event(self, job, type_, reason, message):
        self.calls.append(("event", reason))

    def s3_credentials(self, namespace, name):
        return Credentials(access_key="key", secret_key="secret")


def run(kube, body, pods, now=at(1), nodes=None, fence_error=None, leadership=None):
    body = {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}
    # step 40: the checkpoint opfacts' termination messages name (it must be listed)
    plan = decide(body, pods, {"train": listing(40)}, now, nodes)
    reconciler = Reconciler(kube, OperatorConfig(api_workers=1), leadership=leadership)

    def fence(spec, phase, attempt, pod, when, *, credentials, **kw):
        kube.calls.append(("fence", phase, attempt))
        assert credentials.access_key == "key"
        assert credentials.endpoint_url == "http://127.0.0.1:9000"
        assert credentials.addressing_style == "path"  # a custom endpoint: path-style
        if fence_error:
            raise fence_error
    reconciler.applier.fence_writer = fence
    return asyncio.run(reconciler.apply(body, plan))


def test_intent_then_pod_then_uid_then_events():
    kube = FakeKube()
    run(kube, with_status(job(), phase_status()), [pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI")])
    kinds = [c[0] for c in kube.calls]
    assert kinds[:4] == ["patch", "fence", "create", "patch"]
    assert kube.calls[0][1] == [(2, None)]          # intent: attempt 2, not yet created
    assert kube.calls[1] == ("fence", "train", 2)   # attempt 1 can no longer publish
    assert kube.calls[3][1] == [(2, "uid-new")]     # created: uid recorded
    assert set(kinds[4:]) == {"event"}


def test_pod_of_lost_node_is_force_deleted_after_intent_before_its_replacement():
    kube = FakeKube()
    run(kube, with_status(job(), phase_status()), [pod(node="n1")],
        nodes={"n1": NodeHealth(missing=True)})
    assert [c[0] for c in kube.calls][:5] == ["patch", "delete", "fence", "create", "patch"]
    assert kube.calls[0][1] == [(2, None)]
    assert kube.calls[1] == ("delete", "j.train-1", 0)


def test_no_fence_no_pod():
    """Storage that cannot be fenced: the new attempt is not started while the old one could
    still publish checkpoints."""
    kube = FakeKube()
    with pytest.raises(RetryLater, match="no fence"):
        run(kube, with_status(job(), phase_status()),
            [pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI")],
            fence_error=OSError("S3 unreachable"))
    assert [c[0] for c in kube.calls] == ["patch", "fence", "event"]
    assert kube.calls[-1] == ("event", "StorageError")


class Deposed(Leadership):
    """Leads for ``writes`` more writes, then the lease is gone."""

    def __init__(self, writes):
        self.left = writes

    def holds(self):
        return self.left > 0

    async def write(self, call, fn, *args, **kwargs):
        if self.left <= 0:
            raise NotLeader("deposed")
        self.left -= 1
        return await call(fn, *args, **kwargs)


@pytest.mark.parametrize("writes", [0, 1, 2])
def test_a_deposed_leader_stops_at_its_next_write(writes):
    """The lease moved mid-pass (after the intent, after the fence): nothing more is written,
    not even the event that would report the failure."""
    kube = FakeKube()
    with pytest.raises(NotLeader):
        run(kube, with_status(job(), phase_status()),
            [pod(pod_phase="Failed", exit_code=143, term_reason="preempted",
                 disruption="EvictionByEvictionAPI")], leadership=Deposed(writes))
    assert [c[0] for c in kube.calls] == ["patch", "fence"][:writes]


def test_a_standbys_pass_reads_and_writes_nothing():
    kube = FakeKube()
    reconciler = Reconciler(kube, OperatorConfig(api_workers=1), leadership=Deposed(0))
    assert asyncio.run(reconciler._pass(("ns", "j"))) is None
    assert kube.calls == []


def test_stale_view_creates_nothing():
    kube = FakeKube(patch_error=409)
    with pytest.raises(ApiException):
        run(kube, with_status(job(), phase_status()), [pod(pod_phase="Failed", exit_code=143, term_reason="preempted", disruption="EvictionByEvictionAPI")])
    assert [c[0] for c in kube.calls] == ["patch"]


def test_refused_pod_stops_the_pass():
    kube = FakeKube(create_error=403)
    with pytest.raises(RetryLater, match="refused"):
        run(kube, job(), [])
    assert [c[0] for c in kube.calls] == ["patch", "fence", "create", "event"]
    assert kube.calls[-1] == ("event", "PodCreateFailed")


def test_no_write_when_nothing_changed():
    kube = FakeKube()
    body = with_status(job(), phase_status())
    body["status"] = decide(body, [pod()], {}, at(1)).status
    run(kube, body, [pod()], now=at(2))
    assert kube.calls == []


class NodeKube(FakeKube):
    def __init__(self, nodes, error=None):
        super().__init__()
        self.nodes, self.error = nodes, error

    def get_node(self, name):
        self.calls.append(("get_node", name))
        if self.error:
            raise ApiException(status=self.error, reason="Forbidden")
        return self.nodes.get(name)


def _gather(kube, pods, **config):
    reconciler = Reconciler(kube, OperatorConfig(api_workers=1, **config))
    return asyncio.run(reconciler.gather.nodes(pods))


def test_node_facts_only_for_live_bound_pods_one_read_per_node():
    ready = {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    kube = NodeKube({"n1": ready})
    pods = [pod(node="n1"), pod(attempt=2, node="n1"), pod(attempt=3, node="gone"),
            pod(attempt=4, node="n9", pod_phase="Failed", exit_code=1), pod(attempt=5)]
    facts = _gather(kube, pods)
    assert facts == {"n1": NodeHealth(), "gone": NodeHealth(missing=True)}
    assert sorted(kube.calls) == [("get_node", "gone"), ("get_node", "n1")]


def test_node_of_a_bare_kill_is_read_it_decides_preemption_or_failure():
    kube = NodeKube({})
    pods = [pod(node="n7", pod_phase="Failed", exit_code=137),
            pod(attempt=2, node="n8", pod_phase="Failed", exit_code=143, term_reason="preempted"),
            pod(attempt=3, node="n6", pod_phase="Failed", exit_code=143, term_reason="preempted",
                disruption="EvictionByEvictionAPI")]
    # The trainer's "preempted" alone is a SIGTERM too: its node decides (n8); an eviction
    # says it all (n6).
    assert _gather(kube, pods) == {"n7": NodeHealth(missing=True), "n8": NodeHealth(missing=True)}
    assert kube.calls == [("get_node", "n7"), ("get_node", "n8")]


def test_unreadable_node_is_not_lost_and_reading_can_be_switched_off():
    assert _gather(NodeKube({}, error=403), [pod(node="n1")]) == {}
    kube = NodeKube({})
    assert _gather(kube, [pod(node="n1")], watch_nodes=False) == {} and kube.calls == []


# --- 409 on create: ours (adopt its uid) or someone else's (condition, no loop) ------------
class ForeignKube(FakeKube):
    def create_pod(self, namespace, manifest):
        self.calls.append(("create", manifest["metadata"]["name"]))
        raise ForeignPod(namespace, manifest["metadata"]["name"], "it has no owner")


def test_foreign_pod_on_create_stops_the_pass_without_an_event_loop():
    kube = ForeignKube()
    requeue = run(kube, job(), [])
    assert [c[0] for c in kube.calls] == ["patch", "fence", "create"]
    assert requeue == 0.5  # the next pass finds the pod and reports the conflict


class FakeCore:
    """The two CoreV1Api calls ``Kube.create_pod`` makes."""

    def __init__(self, existing):
        self.existing = existing

    def create_namespaced_pod(self, namespace, manifest, _preload_content=True):
        raise ApiException(status=409, reason="AlreadyExists")

    def read_namespaced_pod(self, name, namespace, _preload_content=True):
        if self.existing is None:
            raise ApiException(status=404, reason="NotFound")
        return type("Resp", (), {"data": json.dumps(self.existing).encode()})()


def _kube_with(existing):
    kube = Kube.__new__(Kube)
    kube.core = FakeCore(existing)
    return kube


MANIFEST = {"metadata": {"name": "j.train-1", "ownerReferences": [{"uid": "u-1"}]}}


def test_existing_pod_is_adopted_only_when_it_has_our_owner():
    ours = {"metadata": {"uid": "p-1", "ownerReferences": [{"uid": "u-1", "kind": "PhoenixJob"}]}}
    assert _kube_with(ours).create_pod("ns", MANIFEST) == "p-1"
    assert _kube_with(None).create_pod("ns", MANIFEST) is None  # gone again meanwhile
    theirs = {"metadata": {"uid": "p-2", "ownerReferences": [
        {"uid": "u-0", "kind": "PhoenixJob", "name": "j", "controller": True}]}}
    with pytest.raises(ForeignPod, match="owned by PhoenixJob j \\(uid u-0\\)"):
        _kube_with(theirs).create_pod("ns", MANIFEST)
    with pytest.raises(ForeignPod, match="no owner"):
        _kube_with({"metadata": {"uid": "p-3"}}).create_pod("ns", MANIFEST)


class PodKube(FakeKube):
    def __init__(self, pods):
        super().__init__()
        self.pods = pods

    def get_pod(self, namespace, name):
        self.calls.append(("get_pod", name))
        return self.pods.get(name)


def test_foreign_fact_is_gathered_only_for_a_named_pod_without_uid_missing_from_the_list():
    body = with_status(job(phases=("train", "eval")), phase_status(attempts=2, podUID=None),
                       phase_status(name="eval"))
    kube = PodKube({"j.train-2": {"metadata": {"uid": "x"}}})
    reconciler = Reconciler(kube, OperatorConfig(api_workers=1))
    assert asyncio.run(reconciler.gather.foreign(body, set())) == {"j.train-2": "it has no owner"}
    assert kube.calls == [("get_pod", "j.train-2")]  # eval has its uid: not read
    kube.calls.clear()
    assert asyncio.run(reconciler.gather.foreign(body, {"j.train-2"})) == {} and kube.calls == []


# --- Events: a repeat is one Event with a count, not another object ------------------------
class EventCore:
    def __init__(self, patch_status=None):
        self.calls, self.patch_status = [], patch_status

    def create_namespaced_event(self, namespace, event):
        self.calls.append(("create", event["reason"], event["count"]))

    def patch_namespaced_event(self, name, namespace, body):
        self.calls.append(("patch", name.split(".")[0], body["count"]))
        if self.patch_status:
            raise ApiException(status=self.patch_status, reason="NotFound")


def _events_kube(core):
    kube = Kube.__new__(Kube)
    kube.core, kube.events = core, EventCache()
    return kube


def test_repeated_event_is_counted_not_reposted():
    core = EventCore()
    kube = _events_kube(core)
    body = job()
    for _ in range(3):
        kube.post_event(body, "Warning", "StorageError", "cannot list checkpoints")
    kube.post_event(body, "Warning", "StorageError", "another message")
    assert core.calls == [("create", "StorageError", 1), ("patch", "j", 2), ("patch", "j", 3),
                          ("create", "StorageError", 1)]


def test_expired_event_is_posted_anew():
    core = EventCore(patch_status=404)
    kube = _events_kube(core)
    kube.post_event(job(), "Normal", "Preempted", "m")
    kube.post_event(job(), "Normal", "Preempted", "m")
    assert [c[0] for c in core.calls] == ["create", "patch", "create"]



# --- per-job exponential backoff -----------------------------------------------------------
def test_backoff_doubles_per_key_caps_and_resets():
    b = Backoff(initial=1.0, maximum=8.0)
    assert [b.failure("a") for _ in range(5)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    assert b.failure("b") == 1.0  # another job is not slowed down
    b.success("a")
    assert b.failure("a") == 1.0


def test_failing_passes_back_off_and_a_good_one_resets():
    """A job whose passes keep failing (API errors, refused pods) is retried after 1, 2, 4 s
    ..., not every 10 s forever; one good pass starts it over; a conflict is not a failure."""
    outcomes = [ApiException(status=500), RetryLater("refused"), ValueError("bug"),
                ApiException(status=409), None, ApiException(status=500)]
    reconciler = Reconciler(FakeKube(), OperatorConfig(api_workers=1))
    delays = []

    async def reconcile(ns, name):
        outcome = outcomes.pop(0)
        if outcome is not None:
            raise outcome
        return None

    reconciler.reconcile = reconcile
    reconciler.queue.add_after = lambda key, delay: delays.append(delay)

    async def main():
        for _ in range(6):
            await reconciler.queue.process(("ns", "j"))
    asyncio.run(main())
    assert delays == [1.0, 2.0, 4.0, 0.2, 1.0]


def test_the_fence_of_a_new_attempt_names_the_checkpoint_it_resumes_from():
    """Issue 22, item 2: the fence written before a replacement starts carries the step the
    operator picked, so the superseded writer's take-back leaves exactly that step alone."""
    from opfacts import listing

    kube = FakeKube()
    body = with_status(job(), phase_status())
    body = {**body, "metadata": {**body["metadata"], "resourceVersion": "1"}}
    ended = pod(pod_phase="Failed", exit_code=143, disruption="EvictionByEvictionAPI")
    plan = decide(body, [ended], {"train": listing(10, 20)}, at(1))
    reconciler = Reconciler(kube, OperatorConfig(api_workers=1))
    written = []
    reconciler.applier.fence_writer = lambda spec, phase, attempt, pod, when, **kw: written.append(
        (attempt, kw.get("resume_from"), kw.get("uid"), kw.get("job"), kw.get("clear_control")))
    asyncio.run(reconciler.apply(body, plan))
    # ... and names the job (issue 22, item 1); a new attempt clears older requests.
    assert written == [(2, "s3://bucket/run/train/step-00000020", "u-1", "ns/j", True)]


@pytest.mark.parametrize("other,live", [
    ({"metadata": {"name": "old", "uid": "u-old"}}, True),    # still there: refused
    ({"metadata": {"name": "old", "uid": "u-new"}}, False),   # re-created since: adoptable
    (None, False),                                            # deleted: adoptable
    (ApiException(status=403, reason="Forbidden"), None),     # cannot tell: refused
])
def test_whether_the_job_a_fence_names_still_exists(other, live):
    from phoenix_operator.decide import Listing
    from phoenix_trainer.core.handshake import Fence

    class Jobs(FakeKube):
        def get_job(self, namespace, name):
            self.calls.append(("get_job", namespace, name))
            if isinstance(other, Exception):
                raise other
            return other

    kube = Jobs()
    reconciler = Reconciler(kube, OperatorConfig(api_workers=1))
    listing = Listing(fence=Fence(5, "old.train-5", "t", uid="u-old", job="team/old"))
    got = asyncio.run(reconciler.gather.owner(listing, "u-1"))
    assert got.owner_live is live and kube.calls == [("get_job", "team", "old")]
    own = Listing(fence=Fence(5, "j.train-5", "t", uid="u-1", job="ns/j"))
    assert asyncio.run(reconciler.gather.owner(own, "u-1")) is own


# --- issue 22, item 12: the operator's own identity only where it is allowed -----------------
def _access(uri: str, secret: str | None, keys=("key", "secret"), **config):
    from phoenix_operator.gather import StorageAccessError

    body = job()
    body["spec"]["checkpoint"] = {"uri": uri, **({"credentialsSecret": secret} if secret else {})}
    kube = FakeKube()
    kube.s3_credentials = lambda namespace, name: Credentials(access_key=keys[0],
                                                             secret_key=keys[1])
    reconciler = Reconciler(kube, OperatorConfig(api_workers=1, **config))
    try:
        return asyncio.run(reconciler.gather.storage_access(body))
    except StorageAccessError as e:
        return str(e)


def test_without_a_secret_the_operator_does_not_lend_its_own_identity():
    """Confused deputy: tenant X points a job at s3://shared/teamY/... without a Secret, and
    the operator wrote a fence there with its own (workload) identity, stopping Y's trainer."""
    why = _access("s3://shared/teamY/run", None)
    assert isinstance(why, str) and "credentialsSecret" in why \
        and "PHOENIX_OWN_IDENTITY_PREFIXES" in why
    allowed = _access("s3://shared/teamX/run", None,
                      own_identity_prefixes=("s3://shared/teamX/",))
    assert allowed.access_key is None  # the default chain: allowed for this prefix only
    assert isinstance(_access("s3://shared/teamX-other/run", None,
                              own_identity_prefixes=("s3://shared/teamX/",)), str)
    assert _access("s3://shared/teamY/run", "creds").access_key == "key"


def test_a_secret_without_keys_does_not_lend_the_operators_own_identity():
    """A credentialsSecret that exists but holds neither key gave boto3 no keys, and boto3
    fell back to the operator's own (default chain) identity, for any prefix."""
    for keys, missing in (((None, None), "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"),
                          (("key", None), "AWS_SECRET_ACCESS_KEY"),
                          ((None, "secret"), "AWS_ACCESS_KEY_ID")):
        why = _access("s3://shared/teamY/run", "creds", keys=keys)
        assert isinstance(why, str) and f"has no {missing}" in why and "creds" in why, why
        # not even under a prefix the operator's own identity may use: the job named a Secret
        assert isinstance(_access("s3://shared/teamX/run", "creds", keys=keys,
                                  own_identity_prefixes=("s3://shared/teamX/",)), str)


def test_file_uris_only_where_the_operator_allows_them():
    """A file:// URI made the operator read and write its own filesystem."""
    why = _access("file:///etc/phoenix", None)
    assert isinstance(why, str) and "PHOENIX_ALLOW_FILE_URIS" in why
    assert isinstance(_access("file:///etc/phoenix", "creds"), str)
    assert _access("file:///data/run", None, allow_file_uris=True).access_key is None
