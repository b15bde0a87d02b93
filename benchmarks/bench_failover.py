"""Operator failover on the lab's real nodes: how long a PhoenixJob waits for recovery when
the operator itself goes at the moment its trainer pod is preempted (issue 24).

The chart is installed as users install it (`phoenix_lab.install.install_phoenix`: the
operator image built from the repository's Dockerfile, in a Deployment on the lab's
kubelets), with one addition: a toleration of the spot taint, so the replicas can spread
over the lab's three nodes instead of sharing the one on-demand node (and, by default, a
required anti-affinity on kubernetes.io/hostname so they never share one: `--spread
preferred` keeps the chart's soft default). Election timings are the chart's defaults
(lease 15 s, renew deadline 10 s, retry 2 s). One PhoenixJob runs the cluster tests' fake
trainer (tests/cluster/fake_trainer.py) with a run far longer than the benchmark.

Variants, one round at a time, the lab made whole again between rounds (the lost node's
replacement Ready, every operator replica Ready, the trainer running):

- crash: the leader's node is lost (`Lab.lose_node`: kubelet, containerd and containers
  killed without a word, the Node deleted, a replacement spot node started) while the
  trainer pod is evicted (Eviction API) at the same moment; if the trainer ran on that node
  it dies with it instead. Marks from the node loss: the Lease naming a new holder, and the
  ADDED event of the replacement trainer pod (the new leader's first recovery action).
- drain: the leader pod is evicted (Eviction API, as `kubectl drain` does; the PDB allows it
  with both replicas Ready) and the trainer pod right after it. Same marks, from the eviction.
- baseline (same run, after the two above): the chart reinstalled with `replicaCount: 1` and
  `leaderElection.enabled: false`, what users had before; the crash again: the lone
  operator's node is lost, and the replacement trainer pod waits for the Deployment's new
  operator pod (pod GC of the pod on the deleted Node, scheduling, start, first pass).

Marks are taken on this machine's monotonic clock from watches (trainer pods, operator pods,
the Lease), as bench_recovery's. Who created each replacement is read from the API server's
audit log (the operator's user agent names its replica). 2 CPUs: the replacement node's
start-up (lose_node copies a node image and starts containerd and a kubelet) runs beside
the takeover, and other labs may share the machine, so treat single figures as noisy.

    PYTHONPATH=operator:trainer_image:lab:benchmarks .venv/bin/python \\
        benchmarks/bench_failover.py --out benchmarks/results/failover.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from kubernetes import client

from phoenix_lab.cluster import Lab, LabPorts
from phoenix_lab.install import NAMESPACE, RELEASE, install_phoenix, uninstall_phoenix

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlab import PodClock, WatchClock, dump_diagnostics  # noqa: E402
from benchstats import ratio, summary  # noqa: E402
# The job's pod template and fake trainer are the cluster tests' own.
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "cluster")]
from pxj_helpers import create, create_job_namespace, phoenixjob  # noqa: E402

JOB = "failover"
BUCKET = "failover"
GRACE = 5
# Never finishes within the benchmark; a checkpoint every 5 s keeps S3 traffic small.
TRAINER_ENV = {"FAKE_STEPS": 10**8, "FAKE_STEP_SECONDS": 0.05, "FAKE_CKPT_EVERY": 100}
SPOT_TOLERATION = {"key": "phoenix.dev/spot", "operator": "Exists", "effect": "NoSchedule"}
OPERATOR_SELECTOR = f"app.kubernetes.io/name=phoenix,app.kubernetes.io/instance={RELEASE}"
LEASE = f"{RELEASE}-operator"  # the chart's fullname, which the Lease shares
BASELINE_VALUES = {"replicaCount": 1, "leaderElection": {"enabled": False},
                   "tolerations": [SPOT_TOLERATION]}


def ha_values(spread: str) -> dict:
    values: dict[str, Any] = {"tolerations": [SPOT_TOLERATION]}
    if spread == "required":
        values["affinity"] = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
            {"topologyKey": "kubernetes.io/hostname",
             "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "phoenix",
                                               "app.kubernetes.io/instance": RELEASE}}}]}}
    return values


class LeaseClock(WatchClock):
    """Watches the operator's Lease; remembers (monotonic time, holder) at every change of
    holder, the first entry being the holder when the watch started."""

    def __init__(self, api: client.ApiClient) -> None:
        super().__init__(client.CoordinationV1Api(api).list_namespaced_lease, NAMESPACE,
                         name="lease-clock", field_selector=f"metadata.name={LEASE}")
        self.changes: list[tuple[float, str]] = []

    def record(self, event: dict, now: float) -> None:
        holder = "" if event["type"] == "DELETED" else (
            event["object"].spec.holder_identity or "")
        if not self.changes or self.changes[-1][1] != holder:
            self.changes.append((now, holder))

    def holder(self) -> str:
        with self.cv:
            return self.changes[-1][1] if self.changes else ""

    def taken_over(self, since: float, old: str) -> tuple[float, str] | None:
        """The first change after ``since`` to a holder that is neither ``old`` nor nobody."""
        with self.cv:
            return next(((t, h) for t, h in self.changes if t >= since and h and h != old), None)


def wait_until(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := fn()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)
    return value


def ready(pod: client.V1Pod) -> bool:
    return pod.status.phase == "Running" and any(
        c.type == "Ready" and c.status == "True" for c in pod.status.conditions or ())


class Bench:
    """The lab, the job and the clocks of one run."""

    def __init__(self, lab: Lab, api: client.ApiClient, ns: str, timeouts: argparse.Namespace):
        self.lab, self.api, self.ns, self.t = lab, api, ns, timeouts
        self.core = client.CoreV1Api(api)
        self.trainers = PodClock(api, ns, f"phoenix.dev/job={JOB}")
        self.operators = PodClock(api, NAMESPACE, OPERATOR_SELECTOR)
        self.lease = LeaseClock(api)
        for clock in (self.trainers, self.operators, self.lease):
            clock.start()

    def close(self) -> None:
        self.trainers.stop.set()
        self.operators.stop.set()
        self.lease.stop.set()

    # --- state ----------------------------------------------------------------------------
    def operator_pods(self) -> list[client.V1Pod]:
        return [p for p in self.core.list_namespaced_pod(
            NAMESPACE, label_selector=OPERATOR_SELECTOR).items if not p.metadata.deletion_timestamp]

    def running_trainer(self) -> client.V1Pod | None:
        pods = [p for p in self.core.list_namespaced_pod(
            self.ns, label_selector=f"phoenix.dev/job={JOB}").items
            if p.status.phase == "Running" and not p.metadata.deletion_timestamp]
        return pods[0] if len(pods) == 1 else None

    def ready_nodes(self) -> set[str]:
        return {n.metadata.name for n in self.core.list_node().items
                if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or ())}

    def pdb_allows(self) -> bool:
        pdb = client.PolicyV1Api(self.api).read_namespaced_pod_disruption_budget(LEASE, NAMESPACE)
        return (pdb.status.disruptions_allowed or 0) >= 1

    def whole(self, replicas: int, election: bool) -> tuple[client.V1Pod, list[client.V1Pod], client.V1Pod]:
        """Wait until the lab is whole: every node Ready; exactly ``replicas`` operator pods,
        all Ready on Ready nodes (a lost node's pod still reads Running and Ready until pod GC
        deletes it: nothing updates it, and it counts for the ReplicaSet and the PDB); a
        leader (the Lease's holder, or the lone pod without election); with election, the
        PDB allowing an eviction; one trainer pod running on a Ready node. Returns (leader
        pod, operator pods, trainer pod)."""
        self.lab.wait_nodes_ready(timeout=self.t.node_timeout)

        def operators():
            pods, nodes = self.operator_pods(), self.ready_nodes()
            if len(pods) != replicas or not all(ready(p) and p.spec.node_name in nodes for p in pods):
                return None
            if not election:
                return pods[0], pods
            leader = next((p for p in pods if p.metadata.name == self.lease.holder()), None)
            return leader and self.pdb_allows() and (leader, pods)

        leader, pods = wait_until(operators, self.t.operator_timeout,
                                  f"exactly {replicas} operator pod(s), Ready on Ready nodes"
                                  + (f", Lease {NAMESPACE}/{LEASE} naming one and the PDB "
                                     "allowing an eviction" if election else ""))

        def trainer():
            pod, nodes = self.running_trainer(), self.ready_nodes()
            return pod if pod is not None and pod.spec.node_name in nodes else None

        pod = wait_until(trainer, self.t.trainer_timeout,
                         f"one running trainer pod of {self.ns}/{JOB} on a Ready node")
        time.sleep(1.0)  # past the trainer's start-up, as a real preemption would find it
        return leader, pods, pod

    def creator(self, pod: str, timeout: float = 5) -> str | None:
        """The user agent that created ``pod`` (the operator's names its replica). The API
        server logs a request once its response is sent: a pod seen a moment ago may not be
        in the file yet."""
        deadline = time.monotonic() + timeout
        while (agent := self._creator(pod)) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        return agent

    def _creator(self, pod: str) -> str | None:
        for e in self.lab.audit_writes():
            ref = e.get("objectRef") or {}
            if (e.get("verb") == "create" and ref.get("resource") == "pods" and not ref.get("subresource")
                    and ref.get("namespace") == self.ns and ref.get("name") == pod
                    and (e.get("responseStatus") or {}).get("code", 200) < 300):
                return e.get("userAgent")
        return None

    # --- one round ------------------------------------------------------------------------
    def round(self, variant: str, n: int, replicas: int, election: bool) -> dict:
        leader, pods, trainer = self.whole(replicas, election)
        old_leader, leader_node = leader.metadata.name, leader.spec.node_name
        trainer_name, trainer_node = trainer.metadata.name, trainer.spec.node_name
        before = set(self.trainers.order)
        operators_before = set(self.operators.order)
        out: dict[str, Any] = {
            "round": n, "leader": old_leader, "leader_node": leader_node,
            "operator_nodes": {p.metadata.name: p.spec.node_name for p in pods},
            "trainer": trainer_name, "trainer_node": trainer_node,
            "trainer_with_leader": trainer_node == leader_node}
        loser = None
        if variant == "drain":
            t0, out["pdb_refusals"] = self.evict(NAMESPACE, old_leader)
            self.lab.evict(self.ns, trainer_name)
        else:  # crash, baseline: the node goes; lose_node blocks while the replacement boots
            t0 = time.monotonic()
            errors: list[BaseException] = []

            def lose():
                try:
                    self.lab.lose_node(leader_node)
                except BaseException as e:  # noqa: BLE001 - reported by the round
                    errors.append(e)

            loser = threading.Thread(target=lose, name="lose-node", daemon=True)
            loser.start()
            if trainer_node != leader_node:
                self.lab.evict(self.ns, trainer_name)
        out["evicted_trainer_after_s"] = round(time.monotonic() - t0, 3)
        timeout = self.t.baseline_timeout if variant == "baseline" else self.t.replace_timeout
        new = self.trainers.wait(
            lambda: next((p for p in self.trainers.order if p not in before), None), timeout,
            f"{variant} round {n}: the replacement of trainer pod {trainer_name}")
        out["replacement"] = new
        out["replacement_s"] = round(self.trainers.added[new] - t0, 3)
        if trainer_name in self.trainers.ended and not out["trainer_with_leader"]:
            # (A pod on the lost node "ends" when the new operator deletes it: no mark.)
            # The old pod's end (its grace: the trainer's emergency checkpoint, the kubelet)
            # comes before any operator may replace it: the operator's part is after it.
            ended = self.trainers.ended[trainer_name]
            out["trainer_ended_s"] = round(ended - t0, 3)
            out["replacement_after_trainer_end_s"] = round(self.trainers.added[new] - ended, 3)
        if election:
            at, holder = self.lease.wait(lambda: self.lease.taken_over(t0, old_leader), 60,
                                         f"{variant} round {n}: Lease {LEASE} naming a holder "
                                         f"other than {old_leader}")
            out.update(new_leader=holder, lease_s=round(at - t0, 3),
                       replacement_after_lease_s=round(self.trainers.added[new] - at, 3))
        else:
            new_op = self.operators.wait(
                lambda: next((p for p in self.operators.order if p not in operators_before), None),
                self.t.baseline_timeout, f"baseline round {n}: the Deployment's new operator pod")
            out.update(new_operator=new_op,
                       operator_pod_added_s=round(self.operators.added[new_op] - t0, 3))
        if loser is not None:
            loser.join(self.t.node_timeout)
            if loser.is_alive():
                raise TimeoutError(f"lose_node({leader_node}) still running after "
                                   f"{self.t.node_timeout}s")
            if errors:
                raise RuntimeError(f"lose_node({leader_node}) failed") from errors[0]
        out["created_by"] = self.creator(new)
        return out

    def evict(self, ns: str, pod: str) -> tuple[float, int]:
        """Evict, retrying while a PodDisruptionBudget refuses (429; ``whole`` waited for it
        to allow one, so this is its status lagging). Returns the monotonic time of the
        accepted request's start and how many were refused."""
        deadline, refused = time.monotonic() + 30, 0
        while True:
            started = time.monotonic()
            try:
                self.lab.evict(ns, pod)
                return started, refused
            except client.ApiException as e:
                if e.status != 429 or time.monotonic() > deadline:
                    raise
                refused += 1
                time.sleep(0.2)


def run_variant(bench: Bench, variant: str, rounds: int, replicas: int, election: bool,
                deadline: float, diagnostics: Path) -> list[dict]:
    results = []
    for n in range(1, rounds + 1):
        if time.monotonic() > deadline:
            print(f"[{variant}] --max-minutes reached; {n - 1} of {rounds} rounds done", flush=True)
            break
        try:
            r = bench.round(variant, n, replicas, election)
        except Exception as e:  # noqa: BLE001 - keep the rounds done, say what broke
            traceback.print_exc()
            r = {"round": n, "error": repr(e)[:500]}
            dump_diagnostics(bench.lab, bench.ns, diagnostics / f"{variant}-{n}")
            results.append(r)
            print(f"[{variant}] round {n} failed: {e!r}; diagnostics in {diagnostics}", flush=True)
            if sum("error" in x for x in results) >= 2:
                print(f"[{variant}] two rounds failed; giving up on this variant", flush=True)
                break
            continue
        results.append(r)
        lease = f", Lease -> {r['new_leader']} in {r['lease_s']:.2f}s" if "lease_s" in r else (
            f", new operator pod in {r['operator_pod_added_s']:.2f}s" if "operator_pod_added_s" in r else "")
        print(f"[{variant}] round {n}: leader {r['leader']} on {r['leader_node']}, trainer on "
              f"{r['trainer_node']}: replacement {r['replacement']} in {r['replacement_s']:.2f}s"
              f"{lease} (created by {r['created_by']})", flush=True)
    return results


def summarize(rounds: list[dict]) -> dict:
    ok = [r for r in rounds if "error" not in r]
    out = {"rounds": len(rounds), "failed": len(rounds) - len(ok),
           "replacement_s": summary([r["replacement_s"] for r in ok])}
    for key in ("lease_s", "replacement_after_lease_s", "trainer_ended_s",
                "replacement_after_trainer_end_s", "operator_pod_added_s"):
        values = [r[key] for r in ok if key in r]
        if values:
            out[key] = summary(values)
    out["shared_node_rounds"] = sum(1 for r in ok if len(set(r["operator_nodes"].values()))
                                    < len(r["operator_nodes"]))
    out["trainer_with_leader_rounds"] = sum(1 for r in ok if r["trainer_with_leader"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "failover.json"))
    ap.add_argument("--rounds", type=int, default=10, help="rounds of crash and of drain each")
    ap.add_argument("--baseline-rounds", type=int, default=3,
                    help="crash rounds with one operator and no election (0: skip)")
    ap.add_argument("--variants", nargs="+", default=["crash", "drain"],
                    choices=["crash", "drain"], help="two-replica variants to run, in order")
    ap.add_argument("--spread", choices=["required", "preferred"], default="required",
                    help="operator replicas' anti-affinity: required (a values override) or the "
                         "chart's preferred default")
    ap.add_argument("--max-minutes", type=float, default=60,
                    help="start no round after this many minutes (the run's results are kept)")
    ap.add_argument("--replace-timeout", type=float, default=120)
    ap.add_argument("--baseline-timeout", type=float, default=300)
    ap.add_argument("--node-timeout", type=float, default=180)
    ap.add_argument("--operator-timeout", type=float, default=300)
    ap.add_argument("--trainer-timeout", type=float, default=180)
    ap.add_argument("--state-dir", help="the lab's state dir (default: a temporary one)")
    args = ap.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    diagnostics = out.with_name(out.stem + "-diagnostics")

    started = time.monotonic()
    deadline = started + args.max_minutes * 60
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg()},
        "rounds": args.rounds, "baseline_rounds": args.baseline_rounds, "spread": args.spread,
        "chart_timings": "defaults (lease 15 s, renew deadline 10 s, retry 2 s)",
        "trainer_grace_seconds": GRACE}
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        lab = Lab(Path(args.state_dir or Path(tmp) / "lab"), ports=LabPorts.ephemeral())
        bench = None
        try:
            lab.up()  # inside the try: a lab that failed half-way up is torn down too
            print(f"[setup] lab up in {time.monotonic() - started:.0f}s", flush=True)
            t1 = time.monotonic()
            install_phoenix(lab, values=ha_values(args.spread), timeout=300)
            print(f"[setup] chart installed (2 replicas) in {time.monotonic() - t1:.0f}s",
                  flush=True)
            with lab.api_client() as api:
                core = client.CoreV1Api(api)
                ns = create_job_namespace(lab, core, prefix="failover")
                lab.s3.client().create_bucket(Bucket=BUCKET)
                job = phoenixjob(JOB, BUCKET, lab.s3.url, image=lab.trainer_image, env=TRAINER_ENV,
                                 grace=GRACE, recovery={"maxFailures": 100})
                create(client.CustomObjectsApi(api), ns, job)
                bench = Bench(lab, api, ns, args)
                for variant in args.variants:
                    rounds = run_variant(bench, variant, args.rounds, 2, True, deadline, diagnostics)
                    result[variant] = {"summary": summarize(rounds), "rounds": rounds}
                if args.baseline_rounds > 0 and time.monotonic() < deadline:
                    t1 = time.monotonic()
                    uninstall_phoenix(lab)
                    wait_until(lambda: not bench.operator_pods(), 120, "the two operators gone")
                    install_phoenix(lab, values=BASELINE_VALUES, timeout=300)
                    print(f"[setup] chart reinstalled (1 replica, no election) in "
                          f"{time.monotonic() - t1:.0f}s", flush=True)
                    rounds = run_variant(bench, "baseline", args.baseline_rounds, 1, False,
                                         deadline, diagnostics)
                    result["baseline"] = {"summary": summarize(rounds), "rounds": rounds}
                crash = (result.get("crash") or {}).get("summary", {}).get("replacement_s", {})
                base = (result.get("baseline") or {}).get("summary", {}).get("replacement_s", {})
                if crash.get("n") and base.get("n"):
                    result["baseline_over_two_replicas"] = {
                        q: ratio(base[q], crash[q]) for q in ("p50", "p95")}
                goals = {}
                if crash.get("n"):
                    goals["crash_p50_within_15s"] = crash["p50"] <= 15
                drain = (result.get("drain") or {}).get("summary", {}).get("replacement_s", {})
                if drain.get("n"):
                    goals["drain_p50_within_2s"] = drain["p50"] <= 2
                result["goals"] = goals
        except Exception as e:
            result["error"] = repr(e)[:1000]
            raise
        finally:
            result["seconds"] = round(time.monotonic() - started, 1)
            result["machine"]["loadavg_at_end"] = os.getloadavg()
            out.write_text(json.dumps(result, indent=2))
            if bench is not None:
                bench.close()
            lab.down()
    for variant in ("crash", "drain", "baseline"):
        if variant in result:
            s = result[variant]["summary"]
            print(variant, json.dumps({k: ({m: round(v[m], 3) for m in ("n", "p50", "p95")
                                            if v.get(m) is not None} if isinstance(v, dict) else v)
                                       for k, v in s.items()}), flush=True)
    print("baseline / two replicas:", result.get("baseline_over_two_replicas"))
    print("goals:", result.get("goals"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
