"""Where a test run's time went: by layer (unit / storage / cluster / e2e), by file, and the
lab's own build steps, printed at the end of every run and kept as JSON.

The README's timing paragraph quotes this report, so it stays true by being re-read rather
than re-measured by hand. A test's time is its setup + call + teardown; a session fixture's
setup (the lab, the S3 server, the e2e chart install) counts against the first test that asks
for it, and the lab's build steps are also listed on their own (``note``).

The JSON goes to ``$PHOENIX_TEST_TIMINGS`` if set, else ``.pytest_cache/phoenix-timings.json``.
Nothing here changes what a test does or whether it passes.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from pathlib import Path

import pytest

# A test's layer is its widest marker: an e2e test that also says `slow` is e2e.
LAYERS = ("e2e", "cluster", "storage", "unit")
TOP_FILES = 15

_notes: dict[str, dict[str, float]] = {}


def note(what: str, steps: dict[str, float]) -> None:
    """Record the steps of a long fixture (``{"images": 12.3, ...}``, seconds) for the report."""
    _notes[what] = {k: round(v, 1) for k, v in steps.items()}


def cpu_probe() -> float:
    """Seconds to hash 64 MiB on one core: the same figure at a run's start and end, and
    between runs, says whether the machine was slower or just shared."""
    data = bytes(64 << 20)
    t0 = time.perf_counter()
    hashlib.sha256(data).digest()
    return round(time.perf_counter() - t0, 3)


def cpus() -> str:
    """The CPUs this run may use: its affinity, and a cgroup quota where one is set."""
    n = len(os.sched_getaffinity(0))
    quota = _cgroup_quota()
    return f"{n} (cgroup quota {quota:.2f})" if quota else str(n)


def _cgroup_quota() -> float | None:
    """CPUs' worth of the cgroup's quota (v2 cpu.max, else v1 cfs); None where unlimited."""
    read = lambda name: Path("/sys/fs/cgroup", name).read_text().strip()  # noqa: E731
    try:
        quota, period = read("cpu.max").split()
    except OSError:
        try:
            quota, period = read("cpu/cpu.cfs_quota_us"), read("cpu/cpu.cfs_period_us")
        except OSError:
            return None
    return None if quota in ("max", "-1") else int(quota) / int(period)


def layer_of(item: pytest.Item) -> str:
    names = {m.name for m in item.iter_markers()}
    return next((layer for layer in LAYERS if layer in names), "unmarked")


class TimingReport:
    def __init__(self) -> None:
        self.layer: dict[str, str] = {}
        self.seconds: dict[str, float] = defaultdict(float)
        self.outcome: dict[str, str] = {}
        self.started = time.monotonic()
        self.probe_start = cpu_probe()
        self.load: list[float] = []  # the 1-minute load average after each test

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        self.layer = {item.nodeid: layer_of(item) for item in items}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[report.nodeid] += report.duration
        if report.when == "teardown":
            self.load.append(os.getloadavg()[0])
        if report.when == "call" or report.outcome != "passed":
            self.outcome.setdefault(report.nodeid, report.outcome)

    def summary(self) -> dict:
        by_layer: dict[str, dict[str, float]] = defaultdict(lambda: {"tests": 0, "seconds": 0.0})
        by_file: dict[str, dict] = defaultdict(lambda: {"tests": 0, "seconds": 0.0, "layer": ""})
        for nodeid, secs in self.seconds.items():
            layer = self.layer.get(nodeid, "unmarked")
            by_layer[layer]["tests"] += 1
            by_layer[layer]["seconds"] += secs
            f = by_file[nodeid.split("::", 1)[0]]
            f["tests"] += 1
            f["seconds"] += secs
            f["layer"] = layer
        rnd = lambda d: {k: {**v, "seconds": round(v["seconds"], 1)} for k, v in d.items()}  # noqa: E731
        return {
            "wall_seconds": round(time.monotonic() - self.started, 1),
            "by_layer": rnd(by_layer),
            "by_file": dict(sorted(rnd(by_file).items(), key=lambda kv: -kv[1]["seconds"])),
            "fixtures": dict(_notes),
            "machine": {"cpus": cpus(),
                        "load1_mean": round(sum(self.load) / len(self.load), 2) if self.load else None,
                        "load1_max": round(max(self.load), 2) if self.load else None,
                        "sha256_64mib_seconds": {"start": self.probe_start, "end": cpu_probe()}},
        }

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.seconds:
            return
        data = self.summary()
        tr = terminalreporter
        tr.section("where the time went")
        total = sum(v["seconds"] for v in data["by_layer"].values()) or 1.0
        for layer in (*LAYERS, "unmarked"):
            v = data["by_layer"].get(layer)
            if v:
                tr.write_line(f"{layer:>9}: {v['tests']:4d} tests {v['seconds']:8.1f}s "
                              f"({100 * v['seconds'] / total:4.1f}%)")
        for what, steps in data["fixtures"].items():
            parts = ", ".join(f"{k} {v:.0f}s" for k, v in steps.items())
            tr.write_line(f"{what}: {parts}")
        m = data["machine"]
        tr.write_line(f"machine: {m['cpus']} CPUs, 1-minute load {m['load1_mean']} on average "
                      f"(max {m['load1_max']}); sha256 of 64 MiB on one core "
                      f"{m['sha256_64mib_seconds']['start']}s at the start, "
                      f"{m['sha256_64mib_seconds']['end']}s at the end")
        tr.write_line(f"slowest files (of {len(data['by_file'])}):")
        for path, v in list(data["by_file"].items())[:TOP_FILES]:
            tr.write_line(f"  {v['seconds']:8.1f}s {v['tests']:4d} {v['layer']:>7}  {path}")
        out = Path(os.environ.get("PHOENIX_TEST_TIMINGS")
                   or Path(tr.config.rootpath) / ".pytest_cache" / "phoenix-timings.json")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(data, indent=2) + "\n")
            tr.write_line(f"(as JSON: {out})")
        except OSError as e:  # a read-only checkout still gets the printed report
            tr.write_line(f"(timings not written: {e})")
