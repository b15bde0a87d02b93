"""Cold pull: how much later a PhoenixJob's trainer starts on a spot node that must pull the
trainer image first, against the same node once it has the image; the pull time as the
operator reports it (``status.phases[].imagePull``, from the kubelet's ``Pulled`` event).

The lab runs an image registry on loopback (``phoenix_lab.registry``: the distribution
project's ``registry``, ``lab/build-binaries.sh registry``) and the trainer image is pushed
into it from the lab's dockerd. Each round starts a fresh *cold* spot node
(``Lab.add_cold_node``: booted from the node image with every image but the pause image
removed, its containerd pulling from the registry through a hosts.toml), then runs one
PhoenixJob pinned to it with the image's registry reference (cold: the pull happens), then the
same job again on the same node (warm: "already present"), then removes the node and the GBs
it pulled. Marks, in seconds from the pod's binding to the node (a watch): the trainer process
started (the kernel's start time, from the trainer's start record) and the trainer training.
The ratio is cold over warm, scheduled -> process, median over rounds.

The registry's storage, the cold nodes' roots and the lab go at the end; the figures are in
the JSON. Peak disk: the registry (the image's compressed layers) plus one cold node's
containerd root (the same layers, compressed and unpacked).

    flock /work/lab.lock .venv/bin/python benchmarks/bench_cold_pull.py --rounds 3 \\
        --out benchmarks/results/cold-pull.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import uuid
from datetime import datetime
from pathlib import Path

from kubernetes import client

from phoenix_lab import samples
from phoenix_lab.cluster import Lab, LabPorts
from phoenix_lab.registry import Registry

from benchlab import LabBench, install_with_namespace, poll

NAMESPACE = "cold-pull"
BUCKET = "cold-pull"


def _unix(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _du(path: Path) -> int:
    """Bytes under ``path`` (``du``: containerd may be collecting snapshots meanwhile)."""
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out.strip() else 0


class Bench(LabBench):
    def __init__(self, lab: Lab, cfg: samples.TrainConfig, run: str) -> None:
        super().__init__(lab, cfg, run, NAMESPACE)

    def job(self, name: str) -> dict:
        return self.custom.get_namespaced_custom_object("phoenix.dev", "v1alpha1", NAMESPACE,
                                                        "phoenixjobs", name)

    def one(self, name: str, image: str, node: str, timeout: float = 1800) -> dict:
        """One PhoenixJob on ``node`` from creation to success; its marks and the operator's
        image pull figure."""
        prefix = f"s3://{BUCKET}/{self.run}/{name}"
        body = samples.phoenixjob(name, NAMESPACE, self.cfg, prefix, self.lab.s3.url, image=image)
        pod_spec = body["spec"]["template"]["spec"]
        pod_spec["nodeSelector"] = {"kubernetes.io/hostname": node}
        pod_spec["containers"][0]["imagePullPolicy"] = "IfNotPresent"
        self.custom.create_namespaced_custom_object("phoenix.dev", "v1alpha1", NAMESPACE,
                                                    "phoenixjobs", body)

        def done():
            st = self.job(name).get("status") or {}
            if st.get("phase") == "Failed":
                raise RuntimeError(f"{name} failed: {json.dumps(st)[:2000]}")
            return st if st.get("phase") == "Succeeded" else None

        poll(f"{name} to succeed", done, timeout, every=1.0)
        phase = samples.job_phase(self.job(name))
        # The operator reads the pull once the trainer started; the job may finish first.
        pull = poll(f"{name}'s imagePull in the status",
                    lambda: samples.job_phase(self.job(name)).get("imagePull"), 60, every=1.0)
        pod = phase.get("pod")
        storage = samples.open_phase_storage(f"{prefix}/train", self.lab.s3)
        from phoenix_trainer.attempt_log import read_metrics

        start = next(r for r in read_metrics(storage) if r.get("event") in ("start", "resume"))
        startup = start.get("startup") or {}
        marks = self.timeline.seen.get(pod, {})
        t0 = marks["scheduled"]
        out = {"process": round(_unix(startup["processStart"]) - t0, 3),
               "training": round(_unix(start["time"]) - t0, 3)}
        if "running" in marks:
            out["running"] = round(marks["running"] - t0, 3)
        return {"job": name, "pod": pod, "node": node, "secondsFromScheduled": out,
                "imagePull": pull}

    def delete(self, name: str, timeout: float = 180) -> None:
        self.custom.delete_namespaced_custom_object(
            "phoenix.dev", "v1alpha1", NAMESPACE, "phoenixjobs", name,
            body=client.V1DeleteOptions(propagation_policy="Foreground"))
        poll(f"{name}'s pods to go", lambda: not self.core.list_namespaced_pod(
            NAMESPACE, label_selector=f"phoenix.dev/job={name}").items, timeout)


def summarize(rounds: list[dict]) -> dict:
    out = {}
    for kind in ("cold", "warm"):
        runs = [r[kind] for r in rounds]
        out[kind] = {m: round(statistics.median(r["secondsFromScheduled"][m] for r in runs), 3)
                     for m in ("process", "training")}
    pulls = [r["cold"]["imagePull"] for r in rounds]
    out["operatorPullSecondsMedian"] = round(statistics.median(p["seconds"] for p in pulls), 3)
    out["imageBytes"] = pulls[0].get("bytes")
    out["coldOverWarmScheduledToProcess"] = round(out["cold"]["process"] / out["warm"]["process"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="cold nodes, one cold and one warm job each")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/cold-pull.json"))
    args = ap.parse_args(argv)
    cfg = samples.TrainConfig(steps=args.steps, step_delay=0.0, checkpoint_every=10)

    state = Path(tempfile.mkdtemp(prefix="phoenix-cold-pull-"))
    lab = Lab(state / "lab", ports=LabPorts.ephemeral())
    registry = Registry(state / "registry")
    bench = None
    disk: dict[str, int] = {}
    try:
        lab.up()
        install_with_namespace(lab, NAMESPACE, BUCKET)
        registry.start()
        print(f"[cold-pull] pushing {lab.trainer_image} to the registry at {registry.address}",
              flush=True)
        image, push_seconds = registry.push(lab.trainer_image)
        disk["registryBytes"] = registry.disk_bytes()
        print(f"[cold-pull] pushed in {push_seconds:.0f}s ({disk['registryBytes'] / 2**30:.2f} "
              "GiB in the registry)", flush=True)
        bench = Bench(lab, cfg, uuid.uuid4().hex[:6])
        rounds: list[dict] = []

        def write(rounds: list[dict]) -> dict:
            """The JSON, rewritten after every round (an interrupted run keeps what it has)."""
            report = {
                "benchmark": "cold pull: a PhoenixJob on a spot node without the trainer image "
                             "(it pulls from the lab's loopback registry) vs the same node with it",
                "image": image, "pushSeconds": round(push_seconds, 1),
                "training": {"steps": cfg.steps, "args": cfg.args()},
                "rounds": len(rounds), "summary": summarize(rounds), "disk": disk,
                "runs": rounds,
            }
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
            return report

        for i in range(args.rounds):
            node = lab.add_cold_node(registry.address)
            try:
                cold = bench.one(f"cold-{i}", image, node.name)
                bench.delete(f"cold-{i}")
                warm = bench.one(f"warm-{i}", image, node.name)
                bench.delete(f"warm-{i}")
                disk[f"coldNodeRootBytesRound{i + 1}"] = _du(node.dir / "containerd" / "root")
            finally:
                lab.remove_node(node.name)
            rounds.append({"round": i + 1, "node": node.name, "cold": cold, "warm": warm})
            write(rounds)
            c, w = cold["secondsFromScheduled"], warm["secondsFromScheduled"]
            p = cold["imagePull"]
            print(f"[cold-pull] round {i + 1}: scheduled -> process cold {c['process']:.1f}s, "
                  f"warm {w['process']:.1f}s; operator: pulled in {p.get('seconds')}s, "
                  f"{(p.get('bytes') or 0) / 2**30:.2f} GiB; warm present={warm['imagePull'].get('present')}",
                  flush=True)
        report = write(rounds)
        print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
        return 0
    finally:
        if bench is not None:
            bench.timeline.stop()
        registry.stop()
        lab.down()
        shutil.rmtree(lab.s3_server.data_dir, ignore_errors=True)
        shutil.rmtree(registry.dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
