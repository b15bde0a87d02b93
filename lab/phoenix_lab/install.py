"""Install Phoenix into the lab with its Helm chart, exactly as a user would on a cluster.

The chart's CRD goes in through Helm's crds/ mechanism; the operator Deployment's pod is
run by the node agent as a host process (command `python -m kopf ...` from the venv),
authenticated with a ServiceAccount token, so the chart's RBAC is what it gets.
`charts/phoenix/ci/lab-values.yaml` binds its endpoints to 127.0.0.1 (pods share the host).
"""
from __future__ import annotations

from . import paths
from .cluster import Lab

CHART = paths.REPO_ROOT / "charts" / "phoenix"
LAB_VALUES = CHART / "ci" / "lab-values.yaml"
RELEASE = "phoenix"
NAMESPACE = "phoenix-system"


def install_phoenix(lab: Lab, release: str = RELEASE, namespace: str = NAMESPACE,
                    extra_args: tuple[str, ...] = ()) -> None:
    """`helm upgrade --install` the chart and wait until the operator pod is ready."""
    lab.helm("upgrade", "--install", release, str(CHART), "-n", namespace, "--create-namespace",
             "-f", str(LAB_VALUES), "--wait", "--timeout", "180s", *extra_args)
    lab.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/phoenixjobs.phoenix.dev")


def uninstall_phoenix(lab: Lab, release: str = RELEASE, namespace: str = NAMESPACE) -> None:
    lab.helm("uninstall", release, "-n", namespace, "--wait", check=False)
