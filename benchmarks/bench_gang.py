"""A gang member lost: how long until every rank trains again, and how many steps are lost,
with ``recovery.gangRestart: Member`` (replace only the lost member; the survivors keep their
pods and hand the newcomer their state) against ``Whole`` (today's restart of every member
from the newest checkpoint), side by side in the same run on the lab's real nodes.

Per mode, one PhoenixJob: a gang of ``--members`` pods x 1 torchrun process each
(``examples/train_distributed.py``, DDP over gloo with the exact all-reduce hook), spread over
the lab's nodes, heartbeats every second. Each round, at a seeded step, one seeded member's
trainer container is SIGKILLed through its node's containerd (``Lab.kill_pod``). Measured per
round, on this machine's clock (the lab's nodes share it):

- **lost -> training**: from the kill to the moment the last rank of the new attempt completed
  its first step (the heartbeats' ``trainingSince``);
- **steps lost**: the step the gang had reached at the kill (the furthest rank's newest
  heartbeat before it, plus the steps its median step time gives for the time since that
  step) minus the step the new attempt
  resumed at (``restoredStep``); never below 0;
- **recovered from**: ``peers`` or ``checkpoint``.

A SIGKILL is a failure: the Whole job waits its backoff (set to 1 s) before the new gang;
Member replaces at once. Both jobs checkpoint every 20 steps.

``Reexec`` (in ``--modes``) is ``Member`` with ``PHOENIX_WARM_REJOIN=0``: the survivors
re-execute their command line instead of handing the next attempt to their warm copy
(trainer's warm.py), the way they rejoined before the copy existed. Each round records how
each survivor came back (``survivors``: ``warm`` or ``re-exec``, from its start line).

``--spare`` adds a third job, ``Spare``: ``gangRestart: Member`` with ``recovery.standby``, so
one spare pod waits warm on a node of its own and takes the lost member's place (no pod is
created). Each round waits until a spare is Ready before the kill, so every round measures a
take-over by a warm spare; the lab then starts with one spot node more (the spare is
required off every member's node), and every mode runs on that lab.

    PYTHONPATH=operator:trainer_image:lab:benchmarks .venv/bin/python benchmarks/bench_gang.py \\
        --rounds 10 --members 3 [--spare] --out benchmarks/results/gang.json
"""
from __future__ import annotations

import argparse
import json
import random
import re
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kubernetes import client

from phoenix_lab import samples
from phoenix_lab.cluster import SPOT_NODES, Lab, LabPorts
from phoenix_trainer.core.heartbeat import Heartbeat, heartbeat_key

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlab import install_with_namespace, keep_failure, poll, write_result  # noqa: E402
from benchstats import summary  # noqa: E402

SPARE, MEMBER = "Spare", "Member"  # Spare: gangRestart Member with a spare (recovery.standby)
REEXEC = "Reexec"  # gangRestart Member, survivors re-exec instead of using their warm copy
REJOINED = re.compile(r"rejoined [0-9.]+s after the loss in attempt (\d+) \(([\w-]+)\)")
NAMESPACE = "bench-gang"
BUCKET = "bench-gang"
STEP_DELAY = 0.05


def gang_job(name: str, lab: Lab, members: int, mode: str, rounds: int) -> dict:
    pod = samples.trainer_pod_spec(lab.trainer_image, spot=False)
    pod.pop("nodeSelector", None)
    pod["tolerations"] = [{"key": "phoenix.dev/spot", "operator": "Exists"}]
    pod["affinity"] = {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
        "weight": 100, "podAffinityTerm": {
            "labelSelector": {"matchLabels": {"phoenix.dev/job": name}},
            "topologyKey": "kubernetes.io/hostname"}}]}}
    c = pod["containers"][0]
    c["command"] = ["python", "-u", "-m", "torch.distributed.run",
                    f"{samples.IMAGE_EXAMPLES}/train_distributed.py", "--mode", "ddp",
                    "--steps", "1000000", f"--step-delay={STEP_DELAY}", "--log-every", "100",
                    "--global-batch", str(8 * members)]
    c["env"] += [{"name": "PHOENIX_HEARTBEAT_SECONDS", "value": "1"},
                 {"name": "PHOENIX_COLLECTIVE_TIMEOUT_SECONDS", "value": "20"},
                 {"name": "PHOENIX_WARM_REJOIN", "value": "0" if mode == REEXEC else "1"}]
    return {
        "apiVersion": f"{samples.GROUP}/{samples.VERSION}", "kind": "PhoenixJob",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "template": {"spec": pod},
            "phases": [{"name": "train", "replicas": members, "nprocPerNode": 1}],
            "checkpoint": {"uri": f"s3://{BUCKET}/{name}", "endpoint": lab.s3.url,
                           "credentialsSecret": samples.CREDENTIALS_SECRET, "keep": 3,
                           "intervalSteps": 20},
            "recovery": {"maxFailures": rounds + 2, "terminationGracePeriodSeconds": 10,
                         "backoff": {"initialSeconds": 1, "maxSeconds": 1},
                         "gangRestart": MEMBER if mode in (SPARE, REEXEC) else mode,
                         "standby": mode == SPARE},
        },
    }


class Gang:
    """One benchmark job: its status and its ranks' heartbeats."""

    def __init__(self, lab: Lab, api: client.ApiClient, name: str, world: int) -> None:
        self.lab, self.name, self.world = lab, name, world
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.storage = samples.open_phase_storage(f"s3://{BUCKET}/{name}/train", lab.s3)

    def phase(self) -> dict:
        job = self.custom.get_namespaced_custom_object(samples.GROUP, samples.VERSION,
                                                       NAMESPACE, samples.PLURAL, self.name)
        return samples.job_phase(job)

    def beats(self, attempt: int) -> list[Heartbeat]:
        out = []
        for rank in range(self.world):
            try:
                out.append(Heartbeat.from_json(self.storage.get_bytes(heartbeat_key(attempt, rank))))
            except (FileNotFoundError, ValueError):
                pass
        return out

    def training(self, attempt: int, since: float = 0.0) -> list[Heartbeat] | None:
        """Every rank of ``attempt`` completed a step after its restore (after ``since``)."""
        beats = self.beats(attempt)
        if len(beats) == self.world and all(
                hb.training_since is not None and hb.training_since >= since for hb in beats):
            return beats
        return None

    def wait(self, what: str, check, timeout: float):
        return poll(f"{self.name}: {what}", check, timeout)

    def survivors(self, lost: str) -> list[str]:
        """The job's running pods other than the lost one (Whole: none survive)."""
        pods = self.core.list_namespaced_pod(NAMESPACE, label_selector=f"phoenix.dev/job={self.name}")
        return [p.metadata.name for p in pods.items
                if p.metadata.name != lost and p.status.phase == "Running"]

    def spare_ready(self) -> str | None:
        """The waiting spare's pod once it is Ready (warm)."""
        sb = self.phase().get("standby") or {}
        return sb.get("pod") if sb.get("reason") == "spare" and sb.get("ready") else None


def run_mode(lab: Lab, api: client.ApiClient, mode: str, args, rng: random.Random) -> dict:
    name = f"gang-{mode.lower()}-{uuid.uuid4().hex[:5]}"
    world = args.members
    lab.kubectl("apply", "-f", "-", input=json.dumps(gang_job(name, lab, args.members, mode,
                                                              args.rounds)))
    gang = Gang(lab, api, name, world)
    rounds = []
    try:
        attempt = gang.wait("first attempt", lambda: gang.phase().get("attempts"), 300)
        gang.wait("training", lambda: gang.training(attempt), 300)
        for r in range(args.rounds):
            ps = gang.phase()
            attempt = ps["attempts"]
            serving = ps.get("members") or [attempt] * args.members
            member = rng.randrange(args.members)
            wait_steps = rng.randint(20, 60)
            spare = gang.wait("a ready spare", gang.spare_ready, 300) if mode == SPARE else None
            start = max(hb.step for hb in gang.beats(attempt))
            gang.wait(f"step {start + wait_steps}", lambda: max(
                (hb.step for hb in gang.beats(attempt)), default=0) >= start + wait_steps, 120)
            beats = gang.beats(attempt)
            pod = (f"{name}.train-{serving[member]}.spare"
                   if member in (ps.get("spareMembers") or ()) else
                   f"{name}.train-{serving[member]}.{member}")
            t0 = time.time()
            lab.kill_pod(NAMESPACE, pod, signal.SIGKILL)
            # the step reached at the kill: the freshest heartbeat, plus the steps since it
            fresh = max(beats, key=lambda hb: hb.step)
            per = fresh.step_p50 or STEP_DELAY
            reached = fresh.step + int(max(0.0, t0 - fresh.last_progress_at) / per)
            nxt = gang.wait("the next attempt", lambda: (a := gang.phase().get("attempts", 0)) > attempt and a, 300)
            # a Whole gang may pass through more than one attempt number; follow the newest
            back = gang.wait("training again", lambda: gang.training(gang.phase()["attempts"], t0), 300)
            again = max(hb.training_since for hb in back) - t0
            resumed = min(hb.restored_step for hb in back if hb.restored_step is not None)
            took = (gang.phase().get("lastReplacement") or {}).get("spare")
            # how each survivor came back, from its start line ("(warm)" or "(re-exec)")
            how = [m.group(2) for p in gang.survivors(pod) for m in REJOINED.finditer(
                lab.pod_logs(NAMESPACE, p)) if int(m.group(1)) == attempt][-args.members:]
            rounds.append({
                "round": r, "member": member, "pod": pod, "attempt": attempt, "next": nxt,
                "spare": took, **({"spare_waiting": spare} if spare else {}), "survivors": how,
                "seconds": round(again, 2), "reached_step": reached, "resumed_step": resumed,
                "steps_lost": max(0, reached - resumed),
                "recovered_from": sorted({hb.restored_from for hb in back})})
            print(f"{mode} round {r}: member {member} lost -> training again in {again:.1f}s, "
                  f"steps lost {rounds[-1]['steps_lost']} ({rounds[-1]['recovered_from']}; "
                  f"survivors {how})", flush=True)
        ps = gang.phase()
    finally:
        lab.kubectl("delete", "pxj", "-n", NAMESPACE, name, "--wait=false", check=False)
    return {"job": name, "phase": {k: ps.get(k) for k in (
                "attempts", "preemptions", "failures", "replacements", "members", "spareMembers")},
            "seconds": summary([x["seconds"] for x in rounds]),
            "steps_lost": summary([float(x["steps_lost"]) for x in rounds]),
            "rounds": rounds}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--members", type=int, default=3)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--modes", default="Member,Whole")
    ap.add_argument("--spare", action="store_true",
                    help="add the Spare mode (Member with a spare pod; the lab gets a spot node more)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gang.json"))
    args = ap.parse_args(argv)
    started = time.monotonic()
    state = Path(tempfile.mkdtemp(prefix="phoenix-gang-"))
    modes = args.modes.split(",") + ([SPARE] if args.spare and SPARE not in args.modes else [])
    lab = Lab(state / "lab", ports=LabPorts.ephemeral(),
              **({"spot_nodes": SPOT_NODES + 1} if SPARE in modes else {}))
    result: dict = {"benchmark": "gang", "settings": vars(args) | {"out": str(args.out)}}
    ok = False
    try:
        lab.up()
        install_with_namespace(lab, NAMESPACE, BUCKET)
        with lab.api_client() as api:
            for mode in modes:
                result[mode] = run_mode(lab, api, mode, args, random.Random(args.seed))
        for slow, fast in (("Whole", MEMBER), ("Whole", SPARE), (MEMBER, SPARE), (REEXEC, MEMBER)):
            if slow in result and fast in result and result[fast]["seconds"].get("p50"):
                result[f"{slow.lower()}_over_{fast.lower()}_p50"] = round(
                    result[slow]["seconds"]["p50"] / result[fast]["seconds"]["p50"], 2)
        ok = True
    except Exception as e:  # noqa: BLE001 - keep what was measured, and the lab's state
        keep_failure(result, e, lab, NAMESPACE, state)
    finally:
        lab.down()
    write_result(result, args.out, started)
    print(json.dumps({k: (v if not isinstance(v, dict) or "rounds" not in v else
                          {kk: vv for kk, vv in v.items() if kk != "rounds"})
                      for k, v in result.items()}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
