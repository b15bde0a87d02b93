"""A gang's sharded checkpoint on the lab's real nodes: 2 pods x 2 processes, FSDP2 over gloo,
about 1 GiB of model + AdamW state, saved with DCP straight to S3 and restored in place.

    PYTHONPATH=operator:trainer_image:lab:benchmarks .venv/bin/python \\
        benchmarks/bench_gang_dcp.py --hidden 9400 --out benchmarks/results/gang-dcp.json

``examples/train_distributed.py --mode fsdp --hidden H`` (three linear layers, the middle one
H x H; H = 9400 gives 88.6 M parameters, 1.06 GB with AdamW's two moments) runs as a PhoenixJob
phase of 2 pods x 2 torchrun processes on the lab's two spot nodes, ``gangRestart: Member``,
checkpointing every ``--interval`` steps. Two jobs, one after the other (the lab's memory
holds one at a time):

- ``reference``: undisturbed;
- ``run``: once its checkpoint at step ``2 x interval`` is committed and it trains on, member
  1's pod is SIGKILLed. The survivors keep their pods and, with the newcomer, roll back to
  that checkpoint. A survivor reads its ranges from the copy of its own objects its pod kept
  (trainer shard_cache.py); the newcomer reads its ranges from S3.

Measured:

- **blocked**: per checkpoint, the seconds the loop waited for its snapshot (the metrics
  records' ``blockedSeconds``, rank 0), against **copy**: the seconds to copy one rank's share
  of the state once in memory on this machine (``copy_`` into a preallocated tensor, one
  thread each, 4 processes at once as the gang's 4 ranks snapshot together on the same cores;
  median of 5). The goal is blocked <= 1.5 x copy. A process's first checkpoint allocates the
  staging buffers (after a rejoin too: a survivor's warm copy is a new process) and is not in
  the steady-state figure.
- **spool**: the peak bytes under each pod's ``/tmp`` emptyDir (where a spool would be),
  sampled every 0.5 s in the node's kubelet directory. The goal is 0.
- **restore**: for each pod after the loss, the MB its ranks read from S3 and from the pod's
  copies (their log lines), over the size of its ranks' own DCP objects (the manifest).
- **equal**: the final checkpoint's weights and optimizer state equal the reference's,
  tensor for tensor.

Never run by the test suite.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from kubernetes import client

from phoenix_lab import samples
from phoenix_lab.cluster import Lab, LabPorts
from phoenix_trainer.attempt_log import read_metrics
from phoenix_trainer.core.layout import list_checkpoints

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlab import install_with_namespace, keep_failure, poll, write_result  # noqa: E402

NAMESPACE = "bench-gang-dcp"
BUCKET = "bench-gang-dcp"
READ = re.compile(r"read ([0-9.]+) MB of checkpoint \S+ sharded state .*?"
                  r"(?:, and ([0-9.]+) MB from this pod's copies of \d+ of them)?$")


def job(name: str, lab: Lab, args) -> dict:
    pod = samples.trainer_pod_spec(lab.trainer_image, spot=True)
    pod["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "labelSelector": {"matchLabels": {"phoenix.dev/job": name}},
        "topologyKey": "kubernetes.io/hostname"}]}}
    c = pod["containers"][0]
    c["command"] = ["python", "-u", "-m", "torch.distributed.run",
                    f"{samples.IMAGE_EXAMPLES}/train_distributed.py", "--mode", "fsdp",
                    "--hidden", str(args.hidden), "--steps", str(args.steps), "--log-every", "1",
                    "--global-batch", "24", "--samples", "480"]
    c["env"] += [{"name": "PHOENIX_HEARTBEAT_SECONDS", "value": "2"},
                 {"name": "PHOENIX_COLLECTIVE_TIMEOUT_SECONDS", "value": "300"}]
    return {
        "apiVersion": f"{samples.GROUP}/{samples.VERSION}", "kind": "PhoenixJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "template": {"spec": pod},
            "phases": [{"name": "train", "replicas": 2, "nprocPerNode": 2}],
            "checkpoint": {"uri": f"s3://{BUCKET}/{name}", "endpoint": lab.s3.url,
                           "credentialsSecret": samples.CREDENTIALS_SECRET, "keep": 2,
                           "intervalSteps": args.interval},
            "recovery": {"maxFailures": 2, "terminationGracePeriodSeconds": 60,
                         "backoff": {"initialSeconds": 1, "maxSeconds": 1},
                         "gangRestart": "Member"},
        },
    }


class SpoolWatch:
    """The peak bytes under the ``tmp`` emptyDir of every pod of ``job``, sampled on the
    nodes' kubelet directories (this machine) every 0.5 s."""

    def __init__(self, lab: Lab, core: client.CoreV1Api, job: str) -> None:
        self.lab, self.core, self.job = lab, core, job
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                pods = self.core.list_namespaced_pod(
                    NAMESPACE, label_selector=f"phoenix.dev/job={self.job}").items
            except Exception:  # noqa: BLE001 - a blip: sample again
                continue
            for p in pods:
                used = 0
                for d in self.lab.state_dir.glob(f"nodes/*/kubelet/pods/{p.metadata.uid}/volumes/"
                                                 "kubernetes.io~empty-dir/tmp"):
                    used += sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
                name = p.metadata.name
                self.peak[name] = max(self.peak.get(name, 0), used)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._t.join(5)
        return dict(self.peak)


def _copier(nbytes: int, start: Any, out: Any) -> None:
    torch.set_num_threads(1)
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page first
    start.wait()
    t0 = time.perf_counter()
    dst.copy_(src)
    out.put(time.perf_counter() - t0)


def copy_seconds(nbytes: int, ranks: int, rounds: int = 5) -> float:
    """One in-memory copy of ``nbytes`` of float32 into a preallocated tensor, by ``ranks``
    processes at once (one thread each), as the gang's ranks snapshot together on this
    machine's cores: the median over ``rounds`` of the median process's time."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    per_round = []
    for _ in range(rounds):
        start, out = ctx.Event(), ctx.Queue()
        procs = [ctx.Process(target=_copier, args=(nbytes, start, out)) for _ in range(ranks)]
        for p in procs:
            p.start()
        time.sleep(1.0 + nbytes / 1e9)  # every process has its buffers
        start.set()
        per_round.append(statistics.median(out.get(timeout=120) for _ in procs))
        for p in procs:
            p.join(30)
    return statistics.median(per_round)


def run_job(lab: Lab, core: client.CoreV1Api, custom: client.CustomObjectsApi, name: str, args,
            kill_after: int | None) -> dict:
    lab.kubectl("apply", "-f", "-", input=json.dumps(job(name, lab, args)))
    storage = samples.open_phase_storage(f"s3://{BUCKET}/{name}/train", lab.s3)
    spool = SpoolWatch(lab, core, name)
    phase = lambda: samples.job_phase(custom.get_namespaced_custom_object(  # noqa: E731
        samples.GROUP, samples.VERSION, NAMESPACE, samples.PLURAL, name))
    out: dict = {"job": name}
    try:
        if kill_after is not None:
            poll(f"{name}: checkpoint {kill_after}", lambda: any(
                c.step >= kill_after for c in list_checkpoints(storage)), args.timeout, 1)
            victim = f"{name}.train-1.1"
            time.sleep(args.kill_delay)  # into the next steps, past the commit
            lab.kill_pod(NAMESPACE, victim, signal.SIGKILL)
            out["killed"] = victim
        done = poll(f"{name}: finished", lambda: (ps := phase()).get("state") in (
            "Succeeded", "Failed") and ps, args.timeout, 2)
        out["phase"] = {k: done.get(k) for k in ("state", "attempts", "failures", "replacements",
                                                  "members", "lastReplacement")}
    finally:
        out["spool_peak_bytes"] = spool.stop()
    records = read_metrics(storage)
    # (step, seconds, whether it was its process's first save: it allocated the buffers)
    seen: set = set()
    out["blocked_seconds"] = []
    for r in records:
        if r.get("event") == "checkpoint":
            first = r.get("attempt") not in seen
            seen.add(r.get("attempt"))
            out["blocked_seconds"].append((r["step"], r.get("blockedSeconds"), first))
    pods = [p.metadata.name for p in core.list_namespaced_pod(
        NAMESPACE, label_selector=f"phoenix.dev/job={name}").items]
    reads = {}
    for p in sorted(pods):
        got = [(float(m.group(1)), float(m.group(2) or 0)) for line in lab.pod_logs(NAMESPACE, p).splitlines()
               if (m := READ.search(line.rstrip()))]
        if got:
            reads[p] = got
    out["restore_reads_mb"] = reads
    infos = {c.step: c for c in list_checkpoints(storage)}
    out["storage"] = storage
    out["checkpoints"] = infos
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=9400)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--interval", type=int, default=4)
    ap.add_argument("--kill-delay", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=1500)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gang-dcp.json"))
    args = ap.parse_args(argv)
    started = time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="phoenix-gang-dcp-"))
    lab = Lab(state / "lab", ports=LabPorts.ephemeral())
    result: dict = {"benchmark": "gang-dcp", "settings": vars(args) | {"out": str(args.out)}}
    ok = False
    try:
        lab.up()
        install_with_namespace(lab, NAMESPACE, BUCKET)
        with lab.api_client() as api:
            core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
            ref = run_job(lab, core, custom, "reference", args, None)
            run = run_job(lab, core, custom, "run", args, 2 * args.interval)
        # every checkpoint has the same objects' sizes (the same shapes): the newest one's
        info = run["checkpoints"][max(run["checkpoints"])]
        own = {n: e.size for n, e in info.manifest.files.items() if n.startswith("dcp-__")}
        shard = statistics.median(own.values())
        copy = copy_seconds(int(shard), ranks=4)
        both = run["blocked_seconds"] + ref["blocked_seconds"]
        blocked = [b for _, b, _ in both if b is not None]
        steady = [b for _, b, first in both if b is not None and not first]
        restore = {}
        for pod, reads in run["restore_reads_mb"].items():  # one line per rank of the pod
            member = int(pod.rsplit(".", 1)[1])
            mine = sum(own[f"dcp-__{member * 2 + r}_0.distcp"] for r in (0, 1)) / 1e6
            storage_mb, local_mb = (round(sum(x[i] for x in reads), 1) for i in (0, 1))
            restore[pod] = {"ranks": len(reads), "storage_mb": storage_mb, "local_mb": local_mb,
                            "own_objects_mb": round(mine, 1),
                            "storage_over_own": round(storage_mb / mine, 3)}
        tmp = state / "weights"
        tmp.mkdir()
        same = samples.tensors_equal(samples.gang_state(run["storage"], tmp),
                                     samples.gang_state(ref["storage"], tmp))
        result.update({
            "state_mb": round(sum(e.size for n, e in info.manifest.files.items()
                                  if n.startswith("dcp-")) / 1e6, 1),
            "rank_shard_mb": round(shard / 1e6, 1),
            "copy_seconds": round(copy, 4),
            "blocked_first_seconds": [b for _, b, first in both if first],
            "blocked_steady_median": round(statistics.median(steady), 4) if steady else None,
            "blocked_over_copy": round(statistics.median(steady) / copy, 2) if steady else None,
            "blocked_all": blocked,
            "spool_peak_bytes": {**ref["spool_peak_bytes"], **run["spool_peak_bytes"]},
            "restore": restore,
            "run_phase": run["phase"], "reference_phase": ref["phase"],
            "killed": run.get("killed"),
            "weights_equal": same,
        })
        ok = same and run["phase"]["state"] == "Succeeded"
    except Exception as e:  # noqa: BLE001 - keep what was measured, and the lab's state
        keep_failure(result, e, lab, NAMESPACE, state)
    finally:
        lab.down()
    write_result(result, args.out, started)
    print(json.dumps(result, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
