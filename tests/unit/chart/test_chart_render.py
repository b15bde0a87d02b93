"""The chart renders what an operator chart should (restricted pod, probes, resources,
least-privilege RBAC in both scopes, explicit command, lab bind address, two replicas with
Lease leader election), and lints clean. Needs only the helm binary."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "charts" / "phoenix"
VALUE_FILES = sorted((CHART / "ci").glob("*-values.yaml"))


def helm_binary() -> str:
    from phoenix_lab.paths import bin_dir

    for candidate in (bin_dir() / "helm", shutil.which("helm")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.skip("helm not found (build the lab binaries: bash lab/build-binaries.sh)")


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([helm_binary(), *args], capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed:\n{proc.stdout}{proc.stderr}")
    return proc


def render(*args: str, release: str = "phx", namespace: str = "phoenix-system") -> list[dict]:
    out = helm("template", release, str(CHART), "-n", namespace, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


LEASE_ROLE = "phx-operator-leader-election"


def job_roles(docs: list[dict]) -> list[dict]:
    """The Roles holding the job rules (scope "namespaces"), not the leader-election one."""
    return [r for r in by_kind(docs, "Role") if r["metadata"]["name"] != LEASE_ROLE]


def operator_container(docs: list[dict]) -> dict:
    (deploy,) = by_kind(docs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize("values", [None, *VALUE_FILES],
                         ids=lambda v: "defaults" if v is None else v.name)
def test_lint_strict_passes(values):
    out = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert "0 chart(s) failed" in out.stdout


def test_sample_values_exist_for_lint():
    assert {p.name for p in VALUE_FILES} >= {"lab-values.yaml", "namespaced-values.yaml"}


def test_chart_ships_the_one_crd_unchanged():
    (crd_file,) = (CHART / "crds").iterdir()
    assert crd_file.read_bytes() == (REPO / "crds" / "phoenixjobs.yaml").read_bytes()
    out = helm("show", "crds", str(CHART)).stdout
    assert [d["metadata"]["name"] for d in yaml.safe_load_all(out) if d] == \
        ["phoenixjobs.phoenix.dev"]


def test_defaults_render_a_restricted_operator_pod():
    docs = render()
    (deploy,) = by_kind(docs, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "phx-operator"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    c = operator_container(docs)
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/healthz", "port": "health"}
    # the root fs is read-only, so /tmp comes from an emptyDir
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert c["image"] == "phoenix-operator:0.1.0"


def test_explicit_command_and_kopf_args_cluster_wide():
    c = operator_container(render())
    # explicit: the chart must not depend on the image's ENTRYPOINT/CMD
    assert c["command"] == ["python", "-m", "kopf"]
    assert c["args"][:3] == ["run", "--module=phoenix_operator.main", "--standalone"]
    assert "--all-namespaces" in c["args"]
    assert "--liveness=http://0.0.0.0:8081/healthz" in c["args"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["PHOENIX_METRICS_HOST"] == "0.0.0.0" and env["PHOENIX_METRICS_PORT"] == "8080"


def test_lab_values_run_the_imported_image_and_extra_env():
    """The lab's values: images exist only inside the nodes (never pulled), and the
    operator is pointed at the apiserver through extraEnv (the lab has no kube-proxy)."""
    docs = render("-f", str(CHART / "ci" / "lab-values.yaml"),
                  "--set", "operator.extraEnv[0].name=KUBERNETES_SERVICE_HOST",
                  "--set", "operator.extraEnv[0].value=10.244.255.1")
    c = operator_container(docs)
    assert c["imagePullPolicy"] == "Never"
    assert "--liveness=http://0.0.0.0:8081/healthz" in c["args"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KUBERNETES_SERVICE_HOST"] == "10.244.255.1"


def test_ipv6_bind_address_is_bracketed_in_the_liveness_url():
    c = operator_container(render("--set", "operator.bindAddress=::"))
    assert "--liveness=http://[::]:8081/healthz" in c["args"]


def _rules(role: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                out.setdefault(f"{group}/{res}", set()).update(rule["verbs"])
    return out


def test_cluster_scope_rbac_is_least_privilege():
    docs = render()
    (role,) = by_kind(docs, "ClusterRole")
    (binding,) = by_kind(docs, "ClusterRoleBinding")
    assert not job_roles(docs)
    rules = _rules(role)
    assert rules["phoenix.dev/phoenixjobs"] == {"get", "list", "watch"}  # spec is the user's
    assert rules["phoenix.dev/phoenixjobs/status"] == {"get", "patch", "update"}
    assert rules["/secrets"] == {"get"}  # never list: only the Secret a job names
    assert rules["/pods"] == {"get", "list", "watch", "create", "delete"}
    assert rules["/nodes"] == {"get", "list", "watch"}  # node loss: read only
    assert "PHOENIX_WATCH_NODES" not in {e["name"] for e in operator_container(docs)["env"]}
    assert not any("*" in verbs or "*" in key for key, verbs in rules.items())
    assert "apps/deployments" not in rules
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "phx-operator",
                                    "namespace": "phoenix-system"}]


def test_namespaced_scope_gets_a_role_per_namespace_and_only_discovery_cluster_wide():
    docs = render("-f", str(CHART / "ci" / "namespaced-values.yaml"))
    roles = job_roles(docs)
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in by_kind(docs, "RoleBinding")
                  if b["metadata"]["name"] != LEASE_ROLE) == ["team-a", "team-b"]
    assert "/secrets" in _rules(roles[0]) and "/pods" in _rules(roles[0])
    (discovery,) = by_kind(docs, "ClusterRole")
    rules = _rules(discovery)
    assert set(rules) == {"apiextensions.k8s.io/customresourcedefinitions", "/namespaces",
                          "/nodes"}
    assert all(verbs == {"get", "list", "watch"} for verbs in rules.values())
    assert "/nodes" not in _rules(roles[0])  # cluster-scoped: a Role could not grant it
    c = operator_container(docs)
    assert "--all-namespaces" not in c["args"]
    assert [a for a in c["args"] if a.startswith("--namespace=")] == \
        ["--namespace=team-a", "--namespace=team-b"]


def test_namespaced_scope_without_discovery_has_no_cluster_objects():
    docs = render("--set", "rbac.scope=namespaces", "--set", "rbac.namespaces={ml}",
                  "--set", "rbac.clusterDiscovery=false")
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    # no right to read Nodes, so the operator must not try (node loss waits for pod GC)
    env = {e["name"]: e.get("value") for e in operator_container(docs)["env"]}
    assert env["PHOENIX_WATCH_NODES"] == "false"


def test_rbac_and_serviceaccount_can_be_brought_by_the_user():
    docs = render("--set", "rbac.create=false", "--set", "serviceAccount.create=false",
                  "--set", "serviceAccount.name=platform-sa")
    kinds = {d["kind"] for d in docs}
    assert kinds.isdisjoint({"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role"})
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == "platform-sa"


def test_metrics_service_selects_the_operator_pod_and_servicemonitor_is_optional():
    docs = render()
    (svc,) = by_kind(docs, "Service")
    (deploy,) = by_kind(docs, "Deployment")
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == "metrics"
    assert not by_kind(docs, "ServiceMonitor")
    docs = render("--set", "metrics.serviceMonitor.enabled=true",
                  "--set", "metrics.serviceMonitor.labels.release=prom")
    (sm,) = by_kind(docs, "ServiceMonitor")
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    # the job's `namespace` label stays ours, not `exported_namespace`
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True
    assert sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()


def test_every_object_carries_the_release_label_so_uninstall_can_be_checked():
    for doc in render("-f", str(CHART / "ci" / "namespaced-values.yaml")):
        assert doc["metadata"]["labels"]["app.kubernetes.io/instance"] == "phx", doc["kind"]


def test_notes_tell_the_user_what_to_do_next():
    out = helm("install", "phx", str(CHART), "-n", "phoenix-system", "--dry-run=client").stdout
    notes = out.split("NOTES:", 1)[1]
    assert "rollout status deployment/phx-operator" in notes
    assert "create secret generic" in notes and "get pxj" in notes
    assert "docs/install.md" in notes


def test_trainer_network_policy_is_optional_and_per_job_namespace():
    """Issue 22, item 13: the trainer's status port is unauthenticated; an optional policy
    keeps other pods off trainer pods, which still reach each other."""
    assert by_kind(render(), "NetworkPolicy") == []
    docs = render("--set", "trainerNetworkPolicy.enabled=true",
                  "--set", "trainerNetworkPolicy.namespaces={team-a,team-b}")
    policies = by_kind(docs, "NetworkPolicy")
    assert [p["metadata"]["namespace"] for p in policies] == ["team-a", "team-b"]
    spec = policies[0]["spec"]
    trainers = {"matchExpressions": [{"key": "phoenix.dev/job", "operator": "Exists"}]}
    assert spec["podSelector"] == trainers and spec["policyTypes"] == ["Ingress"]
    assert spec["ingress"] == [{"from": [{"podSelector": trainers}]}]
    failed = helm("template", "phx", str(CHART), "--set", "trainerNetworkPolicy.enabled=true",
                  check=False)
    assert failed.returncode != 0 and "trainerNetworkPolicy.namespaces" in failed.stderr


def test_operator_identity_prefixes_and_file_uris_reach_the_operator():
    """Issue 22, item 12: the operator's own identity serves only the prefixes listed."""
    env = {e["name"]: e.get("value") for e in operator_container(render())["env"]}
    assert "PHOENIX_OWN_IDENTITY_PREFIXES" not in env and "PHOENIX_ALLOW_FILE_URIS" not in env
    docs = render("--set", "storage.operatorIdentityPrefixes={s3://ml-ckpt/a/,s3://ml-ckpt/b/}",
                  "--set", "storage.allowFileURIs=true")
    env = {e["name"]: e.get("value") for e in operator_container(docs)["env"]}
    assert env["PHOENIX_OWN_IDENTITY_PREFIXES"] == "s3://ml-ckpt/a/,s3://ml-ckpt/b/"
    assert env["PHOENIX_ALLOW_FILE_URIS"] == "true"
    bad = helm("template", "phx", str(CHART), "--set",
               "storage.operatorIdentityPrefixes={gs://x}", check=False)
    assert bad.returncode != 0


# --- two replicas, one leader (issue 24) ----------------------------------------------------
def _env(docs: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in operator_container(docs)["env"]}


def test_defaults_run_two_replicas_with_leader_election_and_a_rolling_update():
    docs = render()
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    # the Lease admits one leader at a time, so old and new pods may overlap in an update
    assert deploy["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    env = _env(docs)
    assert env["PHOENIX_LEADER_ELECTION"]["value"] == "true"
    assert env["PHOENIX_LEASE_NAME"]["value"] == deploy["metadata"]["name"] == "phx-operator"
    assert env["PHOENIX_LEASE_NAMESPACE"]["value"] == "phoenix-system"
    assert env["PHOENIX_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert {k: env[k]["value"] for k in ("PHOENIX_LEASE_DURATION_SECONDS",
                                         "PHOENIX_RENEW_DEADLINE_SECONDS",
                                         "PHOENIX_RETRY_PERIOD_SECONDS")} == {
        "PHOENIX_LEASE_DURATION_SECONDS": "15", "PHOENIX_RENEW_DEADLINE_SECONDS": "10",
        "PHOENIX_RETRY_PERIOD_SECONDS": "2"}
    # kopf's own peering stays off: the operator's Lease decides who writes
    assert "--standalone" in operator_container(docs)["args"]
    # the chart never creates the Lease: the operator does
    assert not by_kind(docs, "Lease")


def test_election_timings_reach_the_operator():
    env = _env(render("--set", "leaderElection.leaseDurationSeconds=30",
                      "--set", "leaderElection.renewDeadlineSeconds=20",
                      "--set", "leaderElection.retryPeriodSeconds=5"))
    assert [env[k]["value"] for k in ("PHOENIX_LEASE_DURATION_SECONDS",
                                      "PHOENIX_RENEW_DEADLINE_SECONDS",
                                      "PHOENIX_RETRY_PERIOD_SECONDS")] == ["30", "20", "5"]


def test_default_pdb_keeps_one_operator_through_a_drain():
    docs = render()
    (pdb,) = by_kind(docs, "PodDisruptionBudget")
    (deploy,) = by_kind(docs, "Deployment")
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["metadata"]["namespace"] == "phoenix-system"
    assert pdb["spec"]["selector"] == deploy["spec"]["selector"]
    assert not by_kind(render("--set", "podDisruptionBudget.enabled=false"),
                       "PodDisruptionBudget")
    # one replica: a PDB would block every drain of its node
    assert not by_kind(render("--set", "replicaCount=1"), "PodDisruptionBudget")


def test_replicas_prefer_different_nodes_unless_the_user_gives_an_affinity():
    docs = render()
    (deploy,) = by_kind(docs, "Deployment")
    affinity = deploy["spec"]["template"]["spec"]["affinity"]
    (term,) = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert term["podAffinityTerm"]["labelSelector"]["matchLabels"] == \
        deploy["spec"]["selector"]["matchLabels"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in affinity["podAntiAffinity"]
    mine = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "node.kubernetes.io/lifecycle", "operator": "In", "values": ["on-demand"]}]}]}}}
    (deploy,) = by_kind(render("--set-json", f"affinity={json.dumps(mine)}"), "Deployment")
    assert deploy["spec"]["template"]["spec"]["affinity"] == mine


@pytest.mark.parametrize("scope", [[], ["-f", str(CHART / "ci" / "namespaced-values.yaml")]],
                         ids=["cluster", "namespaces"])
def test_leader_election_role_is_least_privilege_in_the_release_namespace(scope):
    docs = render(*scope)
    (role,) = [r for r in by_kind(docs, "Role") if r["metadata"]["name"] == LEASE_ROLE]
    (binding,) = [b for b in by_kind(docs, "RoleBinding") if b["metadata"]["name"] == LEASE_ROLE]
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "phoenix-system"
    assert _rules(role) == {"coordination.k8s.io/leases": {"get", "create", "update"},
                            "/events": {"create", "patch"},
                            "events.k8s.io/events": {"create", "patch"}}
    # reading and writing: only the release's own Lease (create cannot be limited by name)
    named = [r for r in role["rules"] if r.get("resourceNames")]
    assert named == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                      "resourceNames": ["phx-operator"], "verbs": ["get", "update"]}]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": LEASE_ROLE}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "phx-operator",
                                    "namespace": "phoenix-system"}]


def test_single_operator_without_election_is_recreated_and_has_no_lease_or_pdb():
    docs = render("--set", "leaderElection.enabled=false", "--set", "replicaCount=1")
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1
    # nothing keeps two lone operators from writing at once, so never run two
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}
    env = _env(docs)
    assert env["PHOENIX_LEADER_ELECTION"]["value"] == "false"
    assert not {"PHOENIX_LEASE_NAME", "PHOENIX_POD_NAME"} & env.keys()
    assert not by_kind(docs, "PodDisruptionBudget")
    assert LEASE_ROLE not in {r["metadata"]["name"] for r in by_kind(docs, "Role")}


def test_single_operator_with_election_still_rolls_with_a_standby():
    docs = render("--set", "replicaCount=1")
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"]["type"] == "RollingUpdate"
    assert _env(docs)["PHOENIX_LEADER_ELECTION"]["value"] == "true"


def test_lab_values_run_two_replicas_so_the_e2e_suite_runs_what_users_install():
    docs = render("-f", str(CHART / "ci" / "lab-values.yaml"))
    (deploy,) = by_kind(docs, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert _env(docs)["PHOENIX_LEADER_ELECTION"]["value"] == "true"


def test_storage_ca_bundle_is_mounted_read_only_and_named_for_boto3():
    """Issue 29: a private CA for the operator's own S3 client (every job's endpoint)."""
    docs = render("--set", "storage.caBundle.configMap=internal-ca",
                  "--set", "storage.caBundle.key=root.pem")
    container = operator_container(docs)
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["AWS_CA_BUNDLE"] == "/etc/phoenix/ca/root.pem"
    assert {"name": "ca-bundle", "mountPath": "/etc/phoenix/ca", "readOnly": True} in \
        container["volumeMounts"]
    (deploy,) = by_kind(docs, "Deployment")
    (volume,) = [v for v in deploy["spec"]["template"]["spec"]["volumes"]
                 if v["name"] == "ca-bundle"]
    assert volume["configMap"] == {"name": "internal-ca",
                                   "items": [{"key": "root.pem", "path": "root.pem"}]}
    # unset: nothing mounted, the image's trust store
    plain = operator_container(render())
    assert "AWS_CA_BUNDLE" not in {e["name"] for e in plain["env"]}
    assert all(m["name"] != "ca-bundle" for m in plain["volumeMounts"])


def test_storage_ca_bundle_key_must_be_a_configmap_key():
    proc = helm("template", "phx", str(CHART), "--set", "storage.caBundle.configMap=ca",
                "--set", "storage.caBundle.key=../etc/passwd", check=False)
    assert proc.returncode != 0 and "caBundle" in proc.stderr
