"""Install Phoenix into the lab with its Helm chart, exactly as a user would on a cluster.

The chart's CRD goes in through Helm's crds/ mechanism; the operator Deployment's pod runs
the operator image built from the repository's Dockerfile on a lab node, as the chart's
ServiceAccount, under restricted Pod Security. Lab-specific values are only where to find
things: the image tag built here (`charts/phoenix/ci/lab-values.yaml` says pullPolicy Never)
and the apiserver's address, because the lab runs no kube-proxy to serve the `kubernetes`
Service's cluster IP (see network.py).
"""
from __future__ import annotations

from pathlib import Path

import yaml

from . import paths
from .cluster import Lab

CHART = paths.REPO_ROOT / "charts" / "phoenix"
LAB_VALUES = CHART / "ci" / "lab-values.yaml"
RELEASE = "phoenix"
NAMESPACE = "phoenix-system"


def lab_values(lab: Lab) -> dict:
    """The values the chart needs on this lab, beyond ci/lab-values.yaml."""
    repository, tag = lab.operator_image.rsplit(":", 1)
    return {
        "image": {"repository": repository, "tag": tag},
        "operator": {"extraEnv": [
            {"name": "KUBERNETES_SERVICE_HOST", "value": lab.host_ip},
            {"name": "KUBERNETES_SERVICE_PORT", "value": str(lab.ports.apiserver)}]},
    }


def helm_install_args(lab: Lab, release: str, namespace: str, values: dict | None = None,
                      upgrade: bool = True) -> list[str]:
    """`helm (upgrade --)install` arguments with the lab's values and `values` on top."""
    merged = _merge(lab_values(lab), values or {})
    path = Path(lab.state_dir) / f"values-{namespace}-{release}.yaml"
    path.write_text(yaml.safe_dump(merged))
    verb = ["upgrade", "--install"] if upgrade else ["install"]
    return [*verb, release, str(CHART), "-n", namespace, "--create-namespace",
            "-f", str(LAB_VALUES), "-f", str(path)]


def install_phoenix(lab: Lab, release: str = RELEASE, namespace: str = NAMESPACE,
                    values: dict | None = None, timeout: int = 180) -> None:
    """`helm upgrade --install` the chart and wait until the operator pod is ready."""
    lab.helm(*helm_install_args(lab, release, namespace, values), "--wait",
             "--timeout", f"{timeout}s", timeout=timeout + 30)
    lab.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                "crd/phoenixjobs.phoenix.dev")


def uninstall_phoenix(lab: Lab, release: str = RELEASE, namespace: str = NAMESPACE) -> None:
    lab.helm("uninstall", release, "-n", namespace, "--wait", check=False)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out
