"""A real Prometheus for the lab: scrapes the targets it is given (the operator replicas'
/metrics at their pod IPs), loads the chart's alert rules, and answers PromQL over its HTTP
API, so tests can check that the chart's dashboard queries and alert expressions find the
operator's series.

It listens on loopback only and scrapes only the addresses it is given (lab pod IPs), with
``honor_labels`` as the chart's ServiceMonitor sets it. Built by lab/build-binaries.sh
(``prometheus``) without service discovery: targets are static."""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import yaml

from . import paths
from .procs import LabError, Service, free_port, http_ready


@dataclass(frozen=True)
class ScrapeTarget:
    """``host:port`` of a /metrics endpoint and the target labels it gets (e.g. ``pod``)."""

    address: str
    labels: dict[str, str] = field(default_factory=dict)


class LabPrometheus:
    """One Prometheus process under ``state_dir`` (config, TSDB, log). ``job`` and the
    targets' labels stand in for what a ServiceMonitor's target labels would be."""

    def __init__(self, state_dir: Path, job: str, targets: Sequence[ScrapeTarget], *,
                 rule_files: Sequence[Path] = (), scrape_interval_s: int = 1) -> None:
        self.state_dir = Path(state_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.job = job
        self.targets = list(targets)
        self.config = self.state_dir / "prometheus.yml"
        interval = f"{scrape_interval_s}s"
        self.config_doc = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval,
                       "evaluation_interval": interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": [{
                "job_name": job, "honor_labels": True, "metrics_path": "/metrics",
                "static_configs": [{"targets": [t.address], "labels": dict(t.labels)}
                                   for t in self.targets]}],
        }
        self.service = Service(
            name="prometheus",
            argv=[str(paths.binary("prometheus")), f"--config.file={self.config}",
                  f"--storage.tsdb.path={self.state_dir / 'tsdb'}",
                  "--storage.tsdb.retention.time=1d",
                  f"--web.listen-address=127.0.0.1:{self.port}"],
            state_dir=self.state_dir, ready=http_ready(f"{self.url}/-/ready"))

    def start(self) -> "LabPrometheus":
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(self.config_doc, sort_keys=False))
        self.service.start(timeout=60)
        return self

    def stop(self) -> None:
        self.service.stop()

    def __enter__(self) -> "LabPrometheus":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def api(self, path: str, **params: str) -> dict | list:
        """GET /api/v1/<path>; the ``data`` of a success, LabError (with the log) otherwise."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        except OSError as e:
            raise LabError(f"Prometheus at {self.url} did not answer {path}: {e}\n"
                           f"{self.service.tail()}") from e
        if body.get("status") != "success":
            raise LabError(f"Prometheus {path} {params}: {body.get('errorType')}: "
                           f"{body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result (a vector: one entry per series)."""
        return self.api("query", query=expr)["result"]

    def scrapes(self) -> dict[str, dict]:
        """The active targets by address: health, last error, last scrape."""
        return {t["scrapeUrl"]: t for t in self.api("targets", state="active")["activeTargets"]}

    def wait_scraped(self, samples: int = 3, timeout: float = 60) -> None:
        """Until every target has answered ``samples`` scrapes in a row (``up`` == 1)."""
        expr = f'count_over_time(up{{job="{self.job}"}}[{samples * 2}s]) >= {samples}'
        deadline = time.monotonic() + timeout
        while True:
            healthy = {r["metric"].get("instance") for r in self.query(
                f'({expr}) and on (instance) up{{job="{self.job}"}} == 1')}
            if healthy >= {t.address for t in self.targets}:
                return
            if time.monotonic() > deadline:
                raise LabError(f"Prometheus has not scraped every target {samples} times in "
                               f"{timeout:.0f}s: {self.scrapes()}")
            time.sleep(0.5)

    def rules(self) -> list[dict]:
        """Every loaded rule with its group, health and last error."""
        return [{**r, "group": g["name"]} for g in self.api("rules")["groups"]
                for r in g["rules"]]


# --- the chart's queries, as Grafana and the rule evaluator would run them ------------------
# Grafana's variables with the values an "All" selection and a short run give them.
GRAFANA_VARIABLES = {"$namespace": ".*", "$phoenixjob": ".*", "${datasource}": ""}
# A trailing `<op> <number>`: an alert's threshold, split off to query its vector alone.
_THRESHOLD = re.compile(r"\s*(>=|<=|==|!=|>|<)\s*-?[0-9.]+(e[-+]?[0-9]+)?\s*$")


def dashboard_queries(dashboard: Path, *, rate_interval: str = "1m",
                      range_: str = "10m") -> list[tuple[str, str]]:
    """(panel title, PromQL) of every query of a Grafana dashboard JSON, its variables
    filled in ($__rate_interval, $__range, and "All" for the rest)."""
    doc = json.loads(Path(dashboard).read_text())
    values = {**GRAFANA_VARIABLES, "$__rate_interval": rate_interval, "$__range": range_}
    out = []
    for panel in doc["panels"]:
        for target in panel.get("targets") or ():
            expr = target["expr"]
            for name in sorted(values, key=len, reverse=True):
                expr = expr.replace(name, values[name])
            if "$" in expr:
                raise ValueError(f"panel {panel['title']!r}: unknown variable in {expr!r}")
            out.append((panel["title"], expr))
    return out


def alert_vectors(rules: Path) -> list[tuple[str, str]]:
    """(alert, the vector its `expr` compares with a threshold) of a rule file."""
    out = []
    for group in yaml.safe_load(Path(rules).read_text())["groups"]:
        for rule in group["rules"]:
            if "alert" in rule:
                vector, n = _THRESHOLD.subn("", rule["expr"].strip())
                if n != 1:
                    raise ValueError(f"alert {rule['alert']}: expr does not end in a threshold")
                out.append((rule["alert"], vector))
    return out
