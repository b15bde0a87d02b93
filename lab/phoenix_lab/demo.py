"""`make demo`: Phoenix on the lab, start to finish, in a few minutes.

1. brings up the lab (etcd, kube-apiserver, controller-manager, scheduler, CoreDNS, real
   kubelet + containerd nodes running the repository's images, an S3 server);
2. installs Phoenix with its Helm chart (the operator pod runs the operator image as the
   chart's ServiceAccount, under restricted Pod Security);
3. applies a two-phase PhoenixJob (train in the trainer image on a spot GPU node with a warm
   standby on the other spot node, then an independent eval) and, alongside it, the
   uninterrupted reference run of the same config on the on-demand node, never disrupted;
4. while the job trains, injects one disruption of every kind, each once the standby is
   ready: a spot reclaim notice (the node tainted karpenter.sh/disrupted, reclaimed 10 s
   later: the trainer checkpoints and hands off to the standby at a step boundary), eviction,
   SIGTERM with a 1 s grace and loss of the node (preemptions), and a SIGKILL of the
   container (a failure: nothing says it came from outside), showing live progress like
   `kubectl get pxj` plus step and loss (read from the trainer's `kubectl logs`) and the
   standby's state;
5. ends with `phoenixctl report`'s summary of the job's history (the same code: steps lost and
   time to resume per disruption, goodput, GPU-hours), the demo's own view (disruptions
   survived, standby promotions, whether the final weights equal the uninterrupted run's,
   tensor for tensor), and the timeline picture (demo-timeline.png, as `phoenixctl timeline
   --out` draws it; needs matplotlib, in the dev extra).

Then the demo stops its lab: left running, its control plane, nodes and operator share the
machine's two cores with whatever comes next (a `make test` after a `make demo` took 55
minutes instead of 29). `--keep-lab` (`make demo KEEP_LAB=1`) keeps it for looking around
(`eval "$(phoenix-lab env)"`, `kubectl describe pxj -n demo`); `phoenix-lab down` stops it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

from . import samples
from .chaos import NOTICE, TRAINER_DISRUPTIONS, Injector
from .cluster import Lab
from .install import install_phoenix
from phoenix_operator.report import build_report, render_text

NAMESPACE = "demo"
JOB = "mlp-demo"
REFERENCE_JOB = "mlp-demo-reference"
BUCKET = "phoenix-demo"
STEPS_BETWEEN_DISRUPTIONS = 50
TIMELINE_PNG = Path("demo-timeline.png")  # written at the end (docs/images/ keeps a copy)


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


class Watcher:
    """Reads the job's status and the running trainer's progress (its log on the lab)."""

    def __init__(self, lab: Lab) -> None:
        from kubernetes import client

        self.lab = lab
        self.api = lab.api_client()
        self.core = client.CoreV1Api(self.api)
        self.custom = client.CustomObjectsApi(self.api)

    def job(self) -> dict:
        return self.custom.get_namespaced_custom_object(
            "phoenix.dev", "v1alpha1", NAMESPACE, "phoenixjobs", JOB)

    def trainer_pods(self, phase: str = "train") -> list:
        pods = self.core.list_namespaced_pod(
            NAMESPACE, label_selector=f"phoenix.dev/job={JOB},phoenix.dev/phase={phase}").items
        return sorted(pods, key=lambda p: int(p.metadata.labels.get("phoenix.dev/attempt", 0)))

    def running_pod(self, job: dict):
        """The active trainer pod (the status names it; a standby runs beside it), running."""
        active = samples.job_phase(job).get("pod")
        for pod in self.trainer_pods():
            if pod.metadata.name == active and pod.status.phase == "Running" \
                    and not pod.metadata.deletion_timestamp:
                return pod
        return None

    def progress(self, pod_name: str) -> tuple[int, float] | None:
        """(last step, loss) the trainer logged, or None before its first step."""
        return samples.logged_progress(self.lab, NAMESPACE, pod_name)


def status_line(t0: float, job: dict, progress: tuple[int, float] | None, cfg: samples.TrainConfig) -> str:
    st = job.get("status") or {}
    step, loss = progress if progress else (st.get("step") or 0, None)
    age = ""
    if st.get("lastCheckpointTime"):
        from datetime import datetime, timezone

        ts = datetime.fromisoformat(st["lastCheckpointTime"].replace("Z", "+00:00"))
        age = f"{(datetime.now(timezone.utc) - ts).total_seconds():.0f}s"
    train = samples.job_phase(job)
    sb = train.get("standby")
    standby = (f"{sb['pod'].rsplit('.', 1)[-1]} {'ready' if sb.get('ready') else 'starting'}"
               if sb else "-")
    return (f"{time.time() - t0:6.0f}s  {st.get('phase', '-'):<10} {st.get('currentPhase', '-'):<6} "
            f"step {step:>4}/{cfg.steps}  loss {loss if loss is not None else '-':<7} "
            f"preemptions {st.get('preemptions', 0):<2} failures {st.get('failures', 0):<2} "
            f"checkpoint-age {age or '-':<4} standby {standby:<16} "
            f"notices {train.get('notices', 0)} promotions {train.get('promotions', 0)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500,
                    help="training steps (enough for five disruptions, each once the standby is ready)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state-dir", type=Path, default=None)
    ap.add_argument("--timeout", type=float, default=900, help="give up after this many seconds")
    ap.add_argument("--keep-lab", action="store_true",
                    help="leave the lab running at the end (it uses the machine's cores until "
                         "`phoenix-lab down`)")
    args = ap.parse_args(argv)
    cfg = samples.TrainConfig(steps=args.steps, seed=args.seed)

    say("bringing up the lab")
    lab = Lab(args.state_dir).up()
    try:
        return run_demo(lab, cfg, args)
    finally:
        lab_cli = f".venv/bin/phoenix-lab --state-dir {lab.state_dir}"
        if args.keep_lab:
            print(f"\n   explore: eval \"$({lab_cli} env)\"; kubectl describe pxj -n {NAMESPACE} {JOB}")
            print(f"   the lab keeps running (it shares this machine's cores); stop it with: {lab_cli} down")
        else:
            say("stopping the lab (make demo KEEP_LAB=1 keeps it running to look around)")
            lab.down()


def run_demo(lab: Lab, cfg: samples.TrainConfig, args: argparse.Namespace) -> int:
    say("installing Phoenix with Helm")
    install_phoenix(lab)
    lab.kubectl("create", "namespace", NAMESPACE, check=False)
    lab.kubectl("apply", "-f", "-", input=json.dumps(samples.credentials_secret(NAMESPACE, lab.s3)))
    lab.kubectl("delete", "phoenixjob", JOB, REFERENCE_JOB, "-n", NAMESPACE, "--ignore-not-found",
                "--wait=true")
    lab.s3_server.ensure_bucket(BUCKET)
    prefix = f"run-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"

    watcher = Watcher(lab)
    manifest = samples.phoenixjob(JOB, NAMESPACE, cfg, f"s3://{BUCKET}/{prefix}", lab.s3.url,
                                  image=lab.trainer_image, with_eval=True)
    manifest["spec"]["recovery"]["standby"] = True  # a warm standby on the other spot node
    say(f"applying PhoenixJob {NAMESPACE}/{JOB} (train -> eval, {cfg.steps} steps, image "
        f"{lab.trainer_image}); checkpoints in s3://{BUCKET}/{prefix}")
    lab.kubectl("apply", "-f", "-", input=json.dumps(manifest))
    t0 = time.time()
    reference = samples.ReferenceRun(lab, NAMESPACE, REFERENCE_JOB, cfg,
                                     f"s3://{BUCKET}/{prefix}-reference").start()
    say(f"applying {NAMESPACE}/{REFERENCE_JOB}: the same training on the on-demand node, "
        "never disrupted, for comparison")

    injector = Injector(lab, NAMESPACE)
    pending = [NOTICE, *TRAINER_DISRUPTIONS]
    injected: list[dict] = []
    disrupted: set[str] = set()
    attempt_start_step: dict[str, int] = {}
    train_done_at = None
    last_print = 0.0
    while True:
        if time.time() - t0 > args.timeout:
            say(f"giving up after {args.timeout:.0f}s; see kubectl describe pxj -n {NAMESPACE} {JOB}")
            return 1
        job = watcher.job()
        st = job.get("status") or {}
        pod = watcher.running_pod(job) if st.get("currentPhase", "train") == "train" else None
        standby_ready = bool((samples.job_phase(job).get("standby") or {}).get("ready"))
        progress = watcher.progress(pod.metadata.name) if pod else None
        if pod and progress and pod.metadata.name not in attempt_start_step:
            attempt_start_step[pod.metadata.name] = progress[0]
        if (pending and pod and progress and pod.metadata.name not in disrupted and standby_ready
                and progress[0] - attempt_start_step[pod.metadata.name] >= STEPS_BETWEEN_DISRUPTIONS
                and progress[0] < cfg.steps - 20):
            kind = pending.pop(0)
            disrupted.add(pod.metadata.name)  # it may look Running for a moment longer
            began = time.time()  # a node loss takes a while to inject; the standby does not wait
            injector.inject(kind, pod.metadata.name, node=pod.spec.node_name)
            injected.append({"kind": kind, "pod": pod.metadata.name, "step": progress[0],
                             "time": began})
            print(f"   !! injected {kind} into {pod.metadata.name} at step {progress[0]}", flush=True)
        if time.time() - last_print >= 2:
            print("   " + status_line(t0, job, progress, cfg), flush=True)
            last_print = time.time()
        train = next((p for p in st.get("phases") or [] if p["name"] == "train"), {})
        if train.get("state") == "Succeeded" and train_done_at is None:
            train_done_at = time.time()
        if st.get("phase") in ("Succeeded", "Failed"):
            print("   " + status_line(t0, job, None, cfg), flush=True)
            break
        time.sleep(0.5)

    train_wall = (train_done_at or time.time()) - t0
    aftermath = injector.wait_idle()
    say("waiting for the uninterrupted reference run")
    reference.wait(timeout=max(60.0, args.timeout - (time.time() - t0)))
    return summarize(lab, cfg, job, injected, reference, train_wall, prefix, aftermath)


def job_history(lab: Lab, job: dict) -> tuple[list[dict], dict]:
    """The job's history and attempt logs, read the way `phoenixctl report` reads them."""
    from phoenix_operator.phase_storage import read_job_history
    from phoenix_operator.phoenixjob import JobSpec
    from phoenix_trainer.core.storage import Credentials

    creds = Credentials(endpoint_url=lab.s3.url, access_key=lab.s3.access_key,
                        secret_key=lab.s3.secret_key)
    return read_job_history(JobSpec.parse(job["spec"]), credentials=creds, logs_for="all")


def write_timeline(records: list[dict], logs: dict, path: Path = TIMELINE_PNG) -> Path | None:
    """The run's timeline as a PNG (as `phoenixctl timeline --out` draws it), when matplotlib is
    installed (the dev and timeline extras); None otherwise."""
    from datetime import datetime, timezone

    from phoenix_operator import timeline

    lanes = timeline.build(records, logs)
    try:
        timeline.render_image(f"PhoenixJob {NAMESPACE}/{JOB} (make demo)", lanes, str(path),
                              datetime.now(timezone.utc))
    except ImportError:
        print(f"   (no timeline picture: matplotlib is not installed; {timeline.INSTALL_HINT})")
        return None
    return path


def summarize(lab: Lab, cfg: samples.TrainConfig, job: dict, injected: list[dict],
              reference: samples.ReferenceRun, train_wall: float, prefix: str,
              aftermath: list[str]) -> int:
    st = job.get("status") or {}
    reference_seconds = reference.train_seconds()
    storage = samples.open_phase_storage(f"s3://{BUCKET}/{prefix}/train", lab.s3)
    print()
    say(f"PhoenixJob {NAMESPACE}/{JOB}: {st.get('phase')}")
    print(lab.kubectl("get", "pxj", "-n", NAMESPACE).stdout)
    same, final_uri = samples.final_weights_equal(storage, reference.storage())
    try:
        evaluation = json.loads(samples.open_phase_storage(
            f"s3://{BUCKET}/{prefix}/eval", lab.s3).get_bytes("eval.json"))
    except FileNotFoundError:
        evaluation = None
    goodput = reference_seconds / train_wall if train_wall > 0 else 0.0
    print()
    say(f"phoenixctl report {JOB} -n {NAMESPACE} (from the job's history in storage)")
    records, logs = job_history(lab, job)
    print(render_text(build_report(f"{NAMESPACE}/{JOB}", records, logs)), end="")
    picture = write_timeline(records, logs)
    print()
    say("summary")
    print(f"   disruptions survived:       {len(injected)} ({', '.join(d['kind'] for d in injected)})")
    train = samples.job_phase(job)
    print(f"   preemptions / failures:     {st.get('preemptions', 0)} / {st.get('failures', 0)} (status)")
    print(f"   notices / promotions:       {train.get('notices', 0)} / {train.get('promotions', 0)} "
          "(the notice was handed off at a step boundary; every attempt after the first was a "
          "warm standby taking over)")
    print(f"   steps lost:                 see the report above (checkpoint every "
          f"{cfg.checkpoint_every} steps; an eviction's emergency checkpoint loses none)")
    print(f"   train phase wall time:      {train_wall:.1f}s (uninterrupted training: {reference_seconds:.1f}s)")
    print(f"   wall-clock goodput:         {goodput:.2f} (the uninterrupted run's training time / "
          "this phase's wall time, pod restarts included)")
    print(f"   final weights == reference: {'yes, tensor for tensor' if same else 'NO'}"
          f" (checkpoint {final_uri or 'none'}; reference: {NAMESPACE}/{reference.name} on the "
          "on-demand node)")
    if picture:
        print(f"   timeline picture:           {picture} (phoenixctl timeline {JOB} -n {NAMESPACE} "
              "--out FILE.png)")
    for problem in aftermath:
        print(f"   !! {problem}")
    if evaluation:
        print(f"   eval phase:                 accuracy {evaluation['accuracy']:.3f}, "
              f"loss {evaluation['loss']:.4f}")
    ok = st.get("phase") == "Succeeded" and same and not aftermath
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
