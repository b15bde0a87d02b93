"""A slow node in a gang: how soon the straggler is named, and the gang's throughput before and
after ``recovery.onStraggler: Replace`` moved its member off that node, on the lab's real
nodes.

One PhoenixJob: a gang of 2 pods x 1 torchrun process (``examples/train_distributed.py``, DDP
over gloo with the exact all-reduce hook, ``gangRestart: Member``), its members preferring the
two spot nodes (one each: required anti-affinity). Every rank on ``lab-spot-2`` sleeps
``--slow-seconds`` before each step's forward (``--slow-node``; the node's name reaches the pod
through the downward API): the node is slow, not the code. The operator names the straggler
(condition and event), stops its pod, and replaces the member in place off that node (the
on-demand node: the other spot node holds the other member), its state from the survivor.

Measured (this machine's clock; the lab's nodes share it):
- **named after**: steps and seconds from the gang's start of training to the ``Straggler``
  event; the documented bound is 20 timed steps + 40 s / step time;
- **throughput**: steps per second of rank 0 over a window before the move and over the same
  length after the gang trains again (``steps_per_second`` before/after and their ratio);
- **move**: from the ``StragglerMoved`` event to every rank training again, and the counts
  (``stragglerMoves``, preemptions, failures).

    PYTHONPATH=operator:trainer_image:lab:benchmarks .venv/bin/python benchmarks/bench_straggler.py \\
        --slow-seconds 0.2 --out benchmarks/results/straggler.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kubernetes import client

from phoenix_lab import samples
from phoenix_lab.cluster import Lab, LabPorts
from phoenix_trainer.core.heartbeat import Heartbeat, heartbeat_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlab import install_with_namespace, keep_failure, poll, write_result  # noqa: E402

NAMESPACE = "bench-straggler"
BUCKET = "bench-straggler"
SLOW_NODE = "lab-spot-2"
STEP_DELAY = 0.05


def straggler_job(name: str, lab: Lab, slow_seconds: float) -> dict:
    pod = samples.trainer_pod_spec(lab.trainer_image, spot=False)
    pod.pop("nodeSelector", None)
    pod["tolerations"] = [{"key": "phoenix.dev/spot", "operator": "Exists"}]
    pod["affinity"] = {
        "podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {"phoenix.dev/job": name}},
            "topologyKey": "kubernetes.io/hostname"}]},
        "nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
            "weight": 100, "preference": {"matchExpressions": [{
                "key": "phoenix.dev/spot", "operator": "In", "values": ["true"]}]}}]}}
    c = pod["containers"][0]
    c["command"] = ["python", "-u", "-m", "torch.distributed.run",
                    f"{samples.IMAGE_EXAMPLES}/train_distributed.py", "--mode", "ddp",
                    "--steps", "1000000", f"--step-delay={STEP_DELAY}", "--log-every", "100",
                    "--slow-node", SLOW_NODE, f"--slow-seconds={slow_seconds}"]
    c["env"] += [{"name": "PHOENIX_HEARTBEAT_SECONDS", "value": "2"},
                 {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    return {
        "apiVersion": f"{samples.GROUP}/{samples.VERSION}", "kind": "PhoenixJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "template": {"spec": pod},
            "phases": [{"name": "train", "replicas": 2, "nprocPerNode": 1}],
            "checkpoint": {"uri": f"s3://{BUCKET}/{name}", "endpoint": lab.s3.url,
                           "credentialsSecret": samples.CREDENTIALS_SECRET, "keep": 3,
                           "intervalSteps": 50},
            "recovery": {"maxFailures": 2, "terminationGracePeriodSeconds": 10,
                         "gangRestart": "Member", "onStraggler": "Replace"},
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slow-seconds", type=float, default=0.2)
    ap.add_argument("--window", type=float, default=30.0, help="seconds of throughput, each side")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/straggler.json"))
    args = ap.parse_args(argv)
    started = time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="phoenix-straggler-"))
    lab = Lab(state / "lab", ports=LabPorts.ephemeral())
    name = f"straggler-{uuid.uuid4().hex[:5]}"
    result: dict = {"benchmark": "straggler", "settings": vars(args) | {"out": str(args.out)}}
    ok = False
    try:
        lab.up()
        install_with_namespace(lab, NAMESPACE, BUCKET)
        storage = samples.open_phase_storage(f"s3://{BUCKET}/{name}/train", lab.s3)
        with lab.api_client() as api:
            custom, core = client.CustomObjectsApi(api), client.CoreV1Api(api)

            def phase() -> dict:
                return samples.job_phase(custom.get_namespaced_custom_object(
                    samples.GROUP, samples.VERSION, NAMESPACE, samples.PLURAL, name))

            def beat(attempt: int, rank: int) -> Heartbeat | None:
                try:
                    return Heartbeat.from_json(storage.get_bytes(heartbeat_key(attempt, rank)))
                except (FileNotFoundError, ValueError):
                    return None

            def event(reason: str):
                items = core.list_namespaced_event(
                    NAMESPACE, field_selector=f"involvedObject.name={name},reason={reason}").items
                return items[0] if items else None

            def wait(what: str, check, timeout: float):
                return poll(what, check, timeout, every=0.5)

            def rate(attempt: int, seconds: float) -> tuple[float, int]:
                """Rank 0's steps per second over ``seconds`` (heartbeat steps, both ends)."""
                a = wait("a heartbeat", lambda: beat(attempt, 0), 120)
                t0 = time.time()
                time.sleep(seconds)
                b = beat(attempt, 0)
                span = (b.last_progress_at - a.last_progress_at) or (time.time() - t0)
                return (b.step - a.step) / span, b.step

            lab.kubectl("apply", "-f", "-", input=json.dumps(straggler_job(name, lab, args.slow_seconds)))
            first = wait("training", lambda: (b := beat(1, 0)) and b.training_since and b, 300)
            nodes = {p.metadata.name: p.spec.node_name for p in core.list_namespaced_pod(
                NAMESPACE, label_selector=f"phoenix.dev/job={name}").items}
            before, _ = rate(1, args.window)
            named = wait("the Straggler event", lambda: event("Straggler"), 600)
            named_at = named.first_timestamp or named.event_time or named.metadata.creation_timestamp
            moved = wait("the StragglerMoved event", lambda: event("StragglerMoved"), 300)
            moved_at = (moved.first_timestamp or moved.event_time
                        or moved.metadata.creation_timestamp).timestamp()
            st = wait("the member replaced and training", lambda: (
                ps := phase()).get("stragglerMoves") == 1 and (ps.get("lastReplacement") or {}).get(
                    "recoveredFrom") and ps, 300)
            attempt = st["attempts"]
            back = [beat(attempt, r) for r in range(2)]
            after, _ = rate(attempt, args.window)
            moved_to = {p.metadata.name: p.spec.node_name for p in core.list_namespaced_pod(
                NAMESPACE, label_selector=f"phoenix.dev/job={name}").items}
            st = phase()
            result.update({
                "nodes_before": nodes, "nodes_after": moved_to,
                "named_after_seconds": round(named_at.timestamp() - first.training_since, 1),
                "documented_bound_seconds": round(20 * (STEP_DELAY + args.slow_seconds) + 40, 1),
                "steps_per_second": {"before": round(before, 2), "after": round(after, 2),
                                     "ratio_after_over_before": round(after / before, 2) if before else None},
                "move_to_training_seconds": round(max(b.training_since for b in back if b) - moved_at, 1),
                "recovered_from": st.get("lastReplacement", {}).get("recoveredFrom"),
                "counts": {k: st.get(k, 0) for k in ("stragglerMoves", "preemptions", "failures",
                                                     "replacements", "attempts")},
                "last_move": st.get("lastMove"),
            })
            ok = st.get("stragglerMoves") == 1 and not st.get("preemptions") and not st.get("failures")
    except Exception as e:  # noqa: BLE001 - keep what was measured, and the lab's state
        keep_failure(result, e, lab, NAMESPACE, state)
    finally:
        lab.down()
    write_result(result, args.out, started)
    print(json.dumps(result, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
