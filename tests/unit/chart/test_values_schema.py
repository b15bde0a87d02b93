"""values.schema.json (and the chart's cross-field checks) reject bad values with a message
that names the value and what is wrong, before anything reaches the cluster."""
from __future__ import annotations

import pytest

from test_chart_render import CHART, helm

pytestmark = pytest.mark.unit

# (id, --set/-f arguments, a fragment the error message must contain)
BAD_VALUES = [
    ("unknown-top-level-key", ["--set", "watchAllNamespace=true"],
     "additional properties 'watchAllNamespace' not allowed"),
    ("typo-in-nested-key", ["--set", "operator.metricPort=9000"],
     "additional properties 'metricPort' not allowed"),
    ("port-out-of-range", ["--set", "operator.metricsPort=70000"],
     "at '/operator/metricsPort': maximum"),
    ("port-is-a-string", ["--set-string", "operator.livenessPort=http"],
     "at '/operator/livenessPort'"),
    ("pull-policy-not-an-enum", ["--set", "image.pullPolicy=Sometimes"],
     "value must be one of 'Always', 'IfNotPresent', 'Never'"),
    ("unknown-rbac-scope", ["--set", "rbac.scope=namespace"],
     "at '/rbac/scope': value must be one of 'cluster', 'namespaces'"),
    ("namespaced-scope-without-namespaces", ["--set", "rbac.scope=namespaces"],
     "at '/rbac/namespaces': minItems"),
    ("namespaces-given-but-cluster-scope", ["--set", "rbac.namespaces={team-a}"],
     "at '/rbac/namespaces': maxItems"),
    ("invalid-namespace-name", ["--set", "rbac.scope=namespaces", "--set",
                                "rbac.namespaces={Team_A}"],
     "at '/rbac/namespaces/0'"),
    ("bind-address-is-a-hostname", ["--set", "operator.bindAddress=localhost"],
     "at '/operator/bindAddress'"),
    ("resync-below-one-second", ["--set", "operator.resyncSeconds=0"],
     "at '/operator/resyncSeconds': minimum"),
    ("log-format-not-an-enum", ["--set", "operator.logFormat=yaml"],
     "at '/operator/logFormat'"),
    ("empty-command", ["--set-json", "command=[]"],
     "at '/command': minItems"),
    ("command-removed", ["--set", "command=null"],
     "missing property 'command'"),
    ("root-allowed", ["--set", "podSecurityContext.runAsNonRoot=false"],
     "at '/podSecurityContext/runAsNonRoot': value must be true"),
    ("privilege-escalation-allowed", ["--set", "securityContext.allowPrivilegeEscalation=true"],
     "at '/securityContext/allowPrivilegeEscalation': value must be false"),
    ("bad-resource-quantity", ["--set", "resources.limits.memory=lots"],
     "at '/resources/limits/memory'"),
    ("replica-count-zero", ["--set", "replicaCount=0"], "at '/replicaCount': minimum"),
    ("replica-count-is-a-string", ["--set-string", "replicaCount=two"],
     "at '/replicaCount': got string, want integer"),
    ("leader-election-not-a-boolean", ["--set-string", "leaderElection.enabled=yes"],
     "at '/leaderElection/enabled': got string, want boolean"),
    ("lease-duration-is-a-string", ["--set-string", "leaderElection.leaseDurationSeconds=15s"],
     "at '/leaderElection/leaseDurationSeconds'"),
    ("retry-period-zero", ["--set", "leaderElection.retryPeriodSeconds=0"],
     "at '/leaderElection/retryPeriodSeconds': minimum"),
    ("typo-in-leader-election", ["--set", "leaderElection.leaseDuration=15"],
     "additional properties 'leaseDuration' not allowed"),
    ("pdb-min-available-zero", ["--set", "podDisruptionBudget.minAvailable=0"],
     "at '/podDisruptionBudget/minAvailable': minimum"),
    ("pdb-typo", ["--set", "podDisruptionBudget.maxUnavailable=1"],
     "additional properties 'maxUnavailable' not allowed"),
    ("bad-scrape-interval", ["--set", "metrics.serviceMonitor.interval=often"],
     "at '/metrics/serviceMonitor/interval'"),
    # cross-field rules the schema cannot express; the templates fail with a message
    ("metrics-and-liveness-on-one-port", ["--set", "operator.metricsPort=8081"],
     "operator.metricsPort and operator.livenessPort are both 8081"),
    ("no-serviceaccount-at-all", ["--set", "serviceAccount.create=false"],
     "set serviceAccount.name to the existing ServiceAccount"),
    ("two-replicas-without-election", ["--set", "leaderElection.enabled=false"],
     "replicaCount is 2 but leaderElection.enabled is false: more than one operator needs "
     "leader election (set leaderElection.enabled=true, or replicaCount=1)"),
    ("renew-deadline-not-below-lease-duration",
     ["--set", "leaderElection.renewDeadlineSeconds=15"],
     "leaderElection.renewDeadlineSeconds (15) must be below "
     "leaderElection.leaseDurationSeconds (15)"),
    ("retry-period-not-below-renew-deadline", ["--set", "leaderElection.retryPeriodSeconds=10"],
     "leaderElection.retryPeriodSeconds (10) must be below "
     "leaderElection.renewDeadlineSeconds (10)"),
    ("pdb-blocks-every-drain", ["--set", "podDisruptionBudget.minAvailable=2"],
     "podDisruptionBudget.minAvailable (2) must be below replicaCount (2)"),
    ("servicemonitor-without-service", ["--set", "metrics.service.enabled=false", "--set",
                                        "metrics.serviceMonitor.enabled=true"],
     "metrics.serviceMonitor.enabled needs metrics.service.enabled"),
]


@pytest.mark.parametrize("args,message", [pytest.param(a, m, id=i) for i, a, m in BAD_VALUES])
def test_bad_values_are_rejected_with_a_clear_message(args, message):
    proc = helm("template", "phx", str(CHART), *args, check=False)
    assert proc.returncode != 0, f"helm accepted {args}"
    assert message in proc.stderr, proc.stderr


def test_bad_values_file_is_rejected_too(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("operator:\n  deepVerify: maybe\n")
    proc = helm("lint", "--strict", str(CHART), "-f", str(bad), check=False)
    assert proc.returncode != 0 and "/operator/deepVerify" in proc.stdout + proc.stderr
