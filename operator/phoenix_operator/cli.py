"""``phoenix``: a small CLI for people. Reads the cluster through the kubeconfig.

    phoenix status JOB [-n NAMESPACE]        per-phase recovery report
    phoenix checkpoints JOB [-n NAMESPACE]   list and verify checkpoints in storage
    phoenix reset JOB [--phase P] [-n NS]    re-run a Failed/Blocked phase (keeps checkpoints)

Never prints secret values: credentials are read from the job's Secret only to open
storage.
"""
from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone

from kubernetes import config as kconfig
from kubernetes.client.rest import ApiException

from . import constants as C
from .decide import member_of
from .kube import Kube
from .model import JobSpec, phase_statuses
from .reset import ResetRefused, reset_status

RESET_ATTEMPTS = 5  # status writes lost to the operator's own writes (409) before giving up


def _age(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "-"
    s = int((now - value).total_seconds())
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m ago"


def _load(args) -> tuple[Kube, dict]:
    kconfig.load_kube_config(config_file=args.kubeconfig, context=args.context)
    kube = Kube()
    namespace = args.namespace or kconfig.list_kube_config_contexts(
        config_file=args.kubeconfig)[1]["context"].get("namespace", "default")
    job = kube.get_job(namespace, args.job)
    if job is None:
        raise SystemExit(f"phoenixjob {namespace}/{args.job} not found")
    return kube, job


def status(args) -> int:
    kube, job = _load(args)
    now = datetime.now(timezone.utc)
    spec = JobSpec.parse(job["spec"])
    st = job.get("status") or {}
    meta = job["metadata"]
    print(f"PhoenixJob {meta['namespace']}/{meta['name']}: {st.get('phase', 'Pending')}"
          f" (current phase: {st.get('currentPhase') or '-'}, "
          f"preemptions {st.get('preemptions', 0)}, failures {st.get('failures', 0)})")
    rec = spec.recovery
    print(f"  budgets per phase: maxPreemptions="
          f"{rec.max_preemptions if rec.max_preemptions is not None else 'unlimited'}, "
          f"maxFailures={rec.max_failures}, backoff {rec.backoff_initial:g}s..{rec.backoff_max:g}s")
    for cond in st.get("conditions") or ():
        if cond.get("status") == "True":
            print(f"  condition {cond['type']}: {cond.get('reason', '')}"
                  + (f" - {cond['message']}" if cond.get("message") else ""))
    print()
    pods = kube.list_pods(meta["namespace"], meta["name"]) if any(
        p.replicas > 1 for p in spec.phases) else []
    for name, ps in phase_statuses(spec, st).items():
        phase = spec.phase(name)
        deps = ", ".join(phase.depends_on) or "-"
        print(f"phase {name} [{ps.state.value}]  depends on: {deps}"
              + ("  (independent)" if phase.independent else ""))
        print(f"  attempts {ps.attempts}, preemptions {ps.preemptions}, failures "
              f"{ps.failures}, pod {ps.pod or '-'}"
              + (f" (gang of {phase.replicas})" if phase.replicas > 1 else ""))
        for pod in _members(pods, name, ps.attempts) if phase.replicas > 1 else ():
            pst = pod.get("status") or {}
            print(f"    member {member_of(pod)}: {pod['metadata']['name']}"
                  f" on {(pod.get('spec') or {}).get('nodeName') or '(not scheduled)'}:"
                  f" {pst.get('phase', '?')}" + (f" ({pst['reason']})" if pst.get("reason") else ""))
        if ps.started_at:
            print(f"  started {_age(ps.started_at, now)}"
                  + (f", finished {_age(ps.completed_at, now)}" if ps.completed_at else ""))
        if ps.resume_from:
            print(f"  resumed from {ps.resume_from}")
        if ps.last_checkpoint:
            ck = ps.last_checkpoint
            print(f"  last checkpoint: step {ck.step} ({_age(ck.time, now)}) {ck.uri}")
        if ps.last_failure:
            lf = ps.last_failure
            code = f", exit code {lf.exit_code}" if lf.exit_code is not None else ""
            print(f"  last {lf.cause}: attempt {lf.attempt} {lf.reason}{code} "
                  f"({_age(lf.time, now)})" + (f": {lf.message}" if lf.message else ""))
        if ps.next_attempt_at and ps.next_attempt_at > now:
            print(f"  next attempt in {int((ps.next_attempt_at - now).total_seconds())}s")
        if ps.skipped_steps:
            print(f"  will not resume from steps {list(ps.skipped_steps)} (crashed repeatedly)")
    return 0


def _members(pods: list[dict], phase: str, attempt: int) -> list[dict]:
    labels = lambda p: (p.get("metadata") or {}).get("labels") or {}  # noqa: E731
    return sorted((p for p in pods if labels(p).get(C.LABEL_PHASE) == phase
                   and labels(p).get(C.LABEL_ATTEMPT) == str(attempt)), key=member_of)


def checkpoints(args) -> int:
    from phoenix_trainer.layout import checkpoint_steps
    from phoenix_trainer.storage import open_storage, verify_checkpoint

    kube, job = _load(args)
    spec = JobSpec.parse(job["spec"])
    ns = job["metadata"]["namespace"]
    access = secret = None
    if spec.checkpoint.credentials_secret:
        access, secret = kube.s3_credentials(ns, spec.checkpoint.credentials_secret)
    endpoint = args.endpoint or spec.checkpoint.endpoint
    statuses = phase_statuses(spec, job.get("status"))
    phases = [args.phase] if args.phase else [p.name for p in spec.phases]
    bad = 0
    for name in phases:
        uri = spec.checkpoint.phase_uri(name)
        print(f"phase {name}: {uri}")
        try:
            storage = open_storage(uri, endpoint_url=endpoint, access_key=access,
                                   secret_key=secret, region=spec.checkpoint.region)
            steps = list(reversed(checkpoint_steps(storage)))
        except Exception as e:  # noqa: BLE001 - report and go on with the next phase
            print(f"  cannot list: {type(e).__name__}: {e}")
            bad += 1
            continue
        if not steps:
            print("  (no checkpoints)")
        skipped = statuses[name].skipped_steps if name in statuses else ()
        for step in steps:
            info = verify_checkpoint(storage, step, deep=not args.shallow)
            m = info.manifest
            mark = "ok " if info.valid else "BAD"
            extra = f"epoch {m.epoch}, {m.time}" if m else ""
            ranks = {n.split("-", 1)[0] for n in (m.files if m else ()) if n.startswith("rank")}
            if ranks:  # a gang's sharded checkpoint: every rank's files are in the manifest
                extra += f", {len(ranks)} ranks, {len(m.files)} files"
            note = "  (skipped by operator)" if step in skipped else ""
            print(f"  {mark} step {step:>8}  {extra}  {info.uri}"
                  + ("" if info.valid else f"  - {info.reason}") + note)
            if not info.valid:
                bad += 1
    return 1 if bad and args.strict else 0


def reset(args) -> int:
    kube, job = _load(args)
    meta = job["metadata"]
    for _ in range(RESET_ATTEMPTS):
        spec = JobSpec.parse(job["spec"])
        try:
            status, names = reset_status(spec, job.get("status"), args.phase, args.force)
        except ResetRefused as e:
            print(f"phoenix reset {meta['namespace']}/{meta['name']}: {e}", file=sys.stderr)
            return 2
        if not names:
            print(f"PhoenixJob {meta['namespace']}/{meta['name']}: no Failed or Blocked phase; "
                  "nothing to reset")
            return 0
        try:
            # Guarded by the resourceVersion we decided on: a concurrent operator write makes
            # this fail (409) and we decide again on the fresh object.
            kube.patch_status(job, status)
        except ApiException as e:
            if e.status != 409:
                raise SystemExit(f"cannot write status of phoenixjob {meta['namespace']}/"
                                 f"{meta['name']}: {e.status} {e.reason}") from e
            job = kube.get_job(meta["namespace"], meta["name"])
            if job is None:
                raise SystemExit(f"phoenixjob {meta['namespace']}/{meta['name']} was deleted")
            continue
        msg = (f"phase {', '.join(names)} reset to Pending by `phoenix reset`; budgets cleared, "
               "attempt numbers continue; the operator resumes from the newest valid checkpoint")
        kube.post_event(job, "Normal", C.EV_PHASE_RESET, msg, component="phoenix-cli")
        print(f"PhoenixJob {meta['namespace']}/{meta['name']}: {msg}")
        return 0
    raise SystemExit(f"phoenixjob {meta['namespace']}/{meta['name']} kept changing; "
                     "try again")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="phoenix", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kubeconfig", default=None)
    parser.add_argument("--context", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="per-phase recovery report of a PhoenixJob")
    p.add_argument("job")
    p.add_argument("-n", "--namespace")
    p.set_defaults(fn=status)
    p = sub.add_parser("checkpoints", help="list and verify a PhoenixJob's checkpoints")
    p.add_argument("job")
    p.add_argument("-n", "--namespace")
    p.add_argument("--phase", help="only this phase")
    p.add_argument("--endpoint", help="S3 endpoint to use instead of spec.checkpoint.endpoint")
    p.add_argument("--shallow", action="store_true", help="skip sha256 (manifest and sizes only)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any checkpoint is invalid")
    p.set_defaults(fn=checkpoints)
    p = sub.add_parser("reset", help="re-run a Failed (or Blocked) phase after fixing the cause;"
                       " keeps the job and its checkpoints")
    p.add_argument("job")
    p.add_argument("-n", "--namespace")
    p.add_argument("--phase", help="only this phase (and the phases it blocked); default: "
                   "every Failed or Blocked phase")
    p.add_argument("--force", action="store_true",
                   help="reset even while another phase is running or recovering")
    p.set_defaults(fn=reset)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
