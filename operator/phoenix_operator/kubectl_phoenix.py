"""``phoenixctl`` (or ``kubectl phoenix``): a small CLI for people. Reads the cluster through
the kubeconfig.

    phoenixctl status JOB       per-phase recovery report
    phoenixctl checkpoints JOB  list and verify checkpoints in storage
    phoenixctl reset JOB        re-run a Failed/Blocked phase (keeps checkpoints)
    phoenixctl report JOB       goodput, steps lost, time to resume, GPU-hours (from the history)
    phoenixctl timeline JOB     the job's attempts as a picture (terminal, or --out FILE.png|svg)
    phoenixctl logs JOB         the logs of the attempts' kept pods, in order

Global flags, as in kubectl, go anywhere on the line (before or after the command and its
arguments): --kubeconfig, --context, -n/--namespace, -o/--output json|yaml. Installed as
``kubectl-phoenix`` too, so ``kubectl phoenix status JOB`` works.

The argument parsing, kubeconfig context/namespace resolution and -o rendering are plain
functions (no cluster) so the unit tests can hold them; only ``_connect`` and the command
bodies talk to the API. Never prints secret values: credentials are read from the job's
Secret only to open storage.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Mapping

import yaml
from kubernetes import config as kconfig
from kubernetes.client.rest import ApiException
from kubernetes.config.kube_config import KubeConfigMerger
from urllib3.exceptions import HTTPError

from . import constants as C
from .kube import Kube
from .leader import describe_lease
from .phoenixjob import JobSpec, parse_ts, phase_statuses
from .decide.plan import gang_pods, pods_by_phase, with_spares
from .podspec import member_of
from .reset import ResetRefused, reset_status

RESET_ATTEMPTS = 5  # status writes lost to the operator's own writes (409) before giving up
OUTPUT_FORMATS = ("json", "yaml")
# The command is not called `phoenix`: that name belongs to other tools (docs/install.md).
PROGRAM = "phoenixctl"
PLUGIN_EXECUTABLE = "kubectl-phoenix"  # kubectl runs `kubectl phoenix` as this, found on PATH
DEFAULT_KUBECONFIG = "~/.kube/config"


class CliError(Exception):
    """A problem the user can fix (no such job, context, kubeconfig): one line, no trace."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


# --- arguments -------------------------------------------------------------------------


def program_name(argv0: str) -> str:
    """What usage and help call us: ``kubectl phoenix`` when kubectl ran us as its plugin
    (it execs ``kubectl-phoenix`` found on PATH), else ``phoenixctl``."""
    base = os.path.basename(argv0)
    base = base[:-4] if base.lower().endswith(".exe") else base
    return "kubectl phoenix" if base == PLUGIN_EXECUTABLE else PROGRAM


def _global_flags(top: bool) -> argparse.ArgumentParser:
    # The same flags are given to the top-level parser and to every subcommand so they can
    # go anywhere on the line. Only the top-level copy has defaults: a subcommand's copy is
    # SUPPRESSed, so its (absent) value never overwrites one given before the command.
    default = None if top else argparse.SUPPRESS
    p = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    g = p.add_argument_group("global flags (anywhere on the line, as in kubectl)")
    g.add_argument("--kubeconfig", default=default, metavar="FILE",
                   help="kubeconfig file (default: $KUBECONFIG, which may list several "
                   "files, else ~/.kube/config)")
    g.add_argument("--context", default=default,
                   help="kubeconfig context to use (default: its current-context)")
    g.add_argument("-n", "--namespace", default=default,
                   help="namespace of the job (default: the context's namespace, else "
                   "'default')")
    g.add_argument("-o", "--output", default=default, choices=OUTPUT_FORMATS,
                   help="print json or yaml for programs instead of the report for people")
    return p


def build_parser(prog: str = PROGRAM) -> argparse.ArgumentParser:
    about = " ".join(__doc__.split("\n\n")[0].split())
    parser = argparse.ArgumentParser(prog=prog, description=about,
                                     parents=[_global_flags(top=True)], allow_abbrev=False)
    flags = [_global_flags(top=False)]
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("status", parents=flags, allow_abbrev=False,
                       help="per-phase recovery report of a PhoenixJob")
    p.add_argument("job")
    p.set_defaults(fn=status)
    p = sub.add_parser("checkpoints", parents=flags, allow_abbrev=False,
                       help="list and verify a PhoenixJob's checkpoints")
    p.add_argument("job")
    p.add_argument("--phase", help="only this phase")
    p.add_argument("--endpoint", help="S3 endpoint to use instead of spec.checkpoint.endpoint")
    p.add_argument("--shallow", action="store_true", help="skip sha256 (manifest and sizes only)")
    p.add_argument("--strict", action="store_true", help="exit 1 if any checkpoint is invalid")
    p.set_defaults(fn=checkpoints)
    p = sub.add_parser("reset", parents=flags, allow_abbrev=False,
                       help="re-run a Failed (or Blocked) phase after fixing the cause;"
                       " keeps the job and its checkpoints")
    p.add_argument("job")
    p.add_argument("--phase", help="only this phase (and the phases it blocked); default: "
                   "every Failed or Blocked phase")
    p.add_argument("--force", action="store_true",
                   help="reset even while another phase is running or recovering")
    p.set_defaults(fn=reset)
    _history_commands(sub, flags)
    return parser


def _history_commands(sub, flags) -> None:
    """report, timeline, logs: read the durable history (docs/operator.md, "History")."""
    p = sub.add_parser("report", parents=flags, allow_abbrev=False,
                       help="goodput, steps lost by cause, time to resume, GPU-hours")
    p.add_argument("job")
    p.add_argument("--endpoint", help="S3 endpoint to use instead of spec.checkpoint.endpoint")
    p.set_defaults(fn=report)
    p = sub.add_parser("timeline", parents=flags, allow_abbrev=False,
                       help="the job's attempts as a picture: terminal, or --out FILE.png|svg")
    p.add_argument("job")
    p.add_argument("--out", metavar="FILE", help="write a PNG or SVG instead (needs matplotlib: "
                   "the `timeline` extra)")
    p.add_argument("--endpoint", help="S3 endpoint to use instead of spec.checkpoint.endpoint")
    p.set_defaults(fn=timeline_cmd)
    p = sub.add_parser("logs", parents=flags, allow_abbrev=False,
                       help="the logs of the job's kept trainer pods, attempt after attempt")
    p.add_argument("job")
    p.add_argument("--attempt", type=int, help="only this attempt")
    p.add_argument("--member", type=int, help="only this gang member")
    p.add_argument("--phase", help="only this phase")
    p.set_defaults(fn=logs)


def parse_args(argv: list[str], prog: str = PROGRAM) -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


# --- kubeconfig: which context, which namespace ------------------------------------------


@dataclass(frozen=True)
class Target:
    kubeconfig: str  # path(s) as the kubernetes client's loader takes them (os.pathsep-joined)
    context: str
    namespace: str


def kubeconfig_paths(flag: str | None, environ: Mapping[str, str]) -> str:
    """--kubeconfig, else $KUBECONFIG (several files joined by os.pathsep), else
    ~/.kube/config. Read at call time: the client's own default is frozen at its import."""
    return flag or environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG


def pick_context(contexts: list[dict], current: str | None, wanted: str | None) -> dict:
    """The kubeconfig context entry (``{"name", "context": {...}}``) to use: --context, else
    the current-context."""
    name = wanted or current
    if not name:
        raise CliError("the kubeconfig has no current-context; pass --context "
                       f"(contexts: {', '.join(_names(contexts)) or 'none'})")
    for ctx in contexts:
        if ctx.get("name") == name:
            return ctx
    raise CliError(f'context "{name}" does not exist in the kubeconfig '
                   f"(contexts: {', '.join(_names(contexts)) or 'none'})")


def _names(contexts: list[dict]) -> list[str]:
    return [str(c.get("name")) for c in contexts]


def namespace_for(context: dict, flag: str | None) -> str:
    """-n wins; else the chosen context's namespace; else "default" (kubectl's rule)."""
    return flag or (context.get("context") or {}).get("namespace") or "default"


def resolve_target(kubeconfig: str | None, context: str | None, namespace: str | None,
                   environ: Mapping[str, str] = os.environ) -> Target:
    """Read the kubeconfig(s) the way the kubernetes client's loader does (its merger: first
    file to define a context wins, current-context as the client reads it), so the namespace
    and the cluster we then connect to come from the same context."""
    paths = kubeconfig_paths(kubeconfig, environ)
    try:
        merged = KubeConfigMerger(paths).config
    except Exception as e:  # noqa: BLE001 - unreadable YAML, a directory, ...: say which file
        raise CliError(f"cannot read kubeconfig {paths}: {e}") from e
    if merged is None:
        raise CliError(f"no kubeconfig found at {paths} (set --kubeconfig or KUBECONFIG)")
    data = merged.value
    contexts = [getattr(c, "value", c) for c in data.get("contexts") or ()]
    ctx = pick_context(contexts, data.get("current-context"), context)
    return Target(paths, ctx["name"], namespace_for(ctx, namespace))


# --- output for programs -----------------------------------------------------------------


def render(document: Any, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(document, indent=2) + "\n"
    if fmt == "yaml":
        return yaml.safe_dump(document, sort_keys=False, default_flow_style=False)
    raise CliError(f"unknown output format {fmt!r} (use one of: {', '.join(OUTPUT_FORMATS)})",
                   code=2)


def status_document(job: dict) -> dict:
    """`status -o`: the job's status as the API holds it (fields: README "Status fields"),
    with the name, namespace and generation it belongs to (compare status.observedGeneration)."""
    meta = job.get("metadata") or {}
    return {"name": meta.get("name"), "namespace": meta.get("namespace"),
            "generation": meta.get("generation"), "status": job.get("status") or {}}


@dataclass(frozen=True)
class CheckpointRow:
    phase: str
    step: int
    uri: str
    valid: bool
    reason: str
    epoch: int | None  # None: no readable manifest
    time: str | None
    ranks: int  # > 0: a gang's sharded checkpoint
    files: int
    skipped: bool  # the operator will not resume from it (crashed there repeatedly)

    def as_dict(self) -> dict:
        return {"phase": self.phase, "step": self.step, "uri": self.uri, "valid": self.valid,
                "reason": self.reason or None, "epoch": self.epoch, "time": self.time,
                "ranks": self.ranks, "files": self.files, "skippedByOperator": self.skipped}

    def text(self) -> str:
        mark = "ok " if self.valid else "BAD"
        extra = f"epoch {self.epoch}, {self.time}" if self.epoch is not None else ""
        if self.ranks:  # a gang's sharded checkpoint: every rank's files are in the manifest
            extra += f", {self.ranks} ranks, {self.files} files"
        note = "  (skipped by operator)" if self.skipped else ""
        return (f"  {mark} step {self.step:>8}  {extra}  {self.uri}"
                + ("" if self.valid else f"  - {self.reason}") + note)


def checkpoint_row(phase: str, info, skipped=()) -> CheckpointRow:
    """From phoenix_trainer's CheckpointInfo (verify_checkpoint's answer)."""
    m = info.manifest
    files = list(m.files) if m else []
    ranks = {n.split("-", 1)[0] for n in files if n.startswith("rank")}
    return CheckpointRow(phase, info.step, info.uri, info.valid, info.reason,
                         m.epoch if m else None, m.time if m else None, len(ranks),
                         len(files), info.step in skipped)


def checkpoints_document(job: dict, rows: list[CheckpointRow],
                         errors: list[dict]) -> dict:
    meta = job.get("metadata") or {}
    return {"name": meta.get("name"), "namespace": meta.get("namespace"),
            "checkpoints": [r.as_dict() for r in rows], "errors": errors}


def _emit(args, document: Any) -> None:
    sys.stdout.write(render(document, args.output))


# --- commands ----------------------------------------------------------------------------


def _age(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "-"
    s = int((now - value).total_seconds())
    if s < 120:
        return f"{s}s ago"
    if s < 7200:
        return f"{s // 60}m ago"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m ago"


def _connect(target: Target) -> Kube:
    try:
        kconfig.load_kube_config(config_file=target.kubeconfig, context=target.context)
    except kconfig.ConfigException as e:
        raise CliError(f"kubeconfig {target.kubeconfig}, context {target.context}: {e}") from e
    return Kube()


def _load(args) -> tuple[Kube, dict]:
    target = resolve_target(args.kubeconfig, args.context, args.namespace)
    kube = _connect(target)
    try:
        job = kube.get_job(target.namespace, args.job)
    except ApiException as e:
        raise CliError(f"cannot read phoenixjob {target.namespace}/{args.job}: "
                       f"{e.status} {e.reason}") from e
    except HTTPError as e:
        raise CliError(f"cannot reach the cluster of context {target.context}: {e}") from e
    if job is None:
        raise CliError(f'phoenixjob "{args.job}" not found in namespace "{target.namespace}"'
                       f" (context {target.context})")
    return kube, job


def operator_leaders(kube: Kube, now: datetime) -> list[dict] | str:
    """The operator's leader Lease(s), described; or why they cannot be read."""
    try:
        return [describe_lease(lease, now) for lease in kube.operator_leases()]
    except ApiException as e:
        return f"cannot read the operator's Lease: {e.status} {e.reason}"


def leader_line(leaders: list[dict] | str, now: datetime) -> str:
    if isinstance(leaders, str):
        return f"  operator: {leaders}"
    if not leaders:
        return "  operator: no leader Lease (a standalone operator, or none running)"
    parts = []
    for d in leaders:
        since = _age(parse_ts(d["since"]), now)
        if not d["leader"]:
            parts.append(f"no leader (lease {d['lease']} released {since}, term {d['term']})")
        else:
            state = (f"; not renewed since {_age(parse_ts(d['renewed']), now)}: a "
                     "standby takes over" if d["expired"] else "")
            parts.append(f"leader {d['leader']} (term {d['term']}, since {since}, lease "
                         f"{d['lease']}{state})")
    return "  operator: " + "; ".join(parts)


def progress_lines(ps, rec, now: datetime) -> list[str]:
    """The running attempt's progress (its heartbeats, as the status records them), the hang
    deadline, stragglers, and the last hang."""
    out = []
    pr = ps.progress
    if pr is not None and pr.attempt == ps.attempts and ps.state.value == "Running":
        per = f", {pr.step_seconds:.3g}s/step" if pr.step_seconds else ""
        line = f"  last step: {pr.step} ({_age(pr.last_step_time, now)}{per})"
        if not rec.hang_detection:
            line += "; hang detection off"
        elif pr.hang_timeout:
            left = pr.hang_timeout - (now - pr.last_step_time).total_seconds()
            line += (f"; hung after {pr.hang_timeout:.0f}s without progress "
                     f"({max(0, left):.0f}s left)")
        out.append(line)
        out += [f"  straggler: {s.describe()}" for s in pr.stragglers]
    if ps.last_hang is not None:
        h = ps.last_hang
        out.append(f"  last hang: attempt {h.attempt} ({_age(h.time, now)}): {h.describe()}")
    out += replacement_lines(ps, now)
    sb = ps.standby
    if sb is not None and sb.reason == C.SPARE:
        out.append(f"  spare: pod {sb.pod} (attempt {sb.attempt}) on "
                   f"{sb.node or '(not scheduled)'}, {'ready' if sb.ready else 'not ready yet'}"
                   f" ({_age(sb.since, now)}); takes the next lost member's place")
    return out


def image_pull_line(ps) -> str:
    """How the attempt's pod got its image (the kubelet's Pulled event, as the status
    records it)."""
    p = ps.image_pull
    whose = "this attempt" if p.attempt == ps.attempts else f"attempt {p.attempt}"
    return f"  start-up ({whose}, pod {p.pod}): {p.describe()}"


def replacement_lines(ps, now: datetime) -> list[str]:
    """An in-place gang's replaced members: which, where the state came from, how long the
    gang took to train again."""
    r = ps.last_replacement
    if r is None:
        return []  # a move is followed by its replacement: shown with it
    line = (f"  members replaced: {ps.replacements} time(s); last {_age(r.time, now)}: "
            f"{r.describe()}")
    if r.recovered_from:
        line += f"; state from {r.recovered_from}"
        if r.resumed_step is not None:
            line += f" at step {r.resumed_step}"
    if r.training_again_seconds is not None:
        line += f"; every rank training again after {r.training_again_seconds:.1f}s"
    out = [line]
    m = ps.last_move
    if m is not None:
        out.append(f"  straggler moves: {ps.straggler_moves}; last {_age(m.time, now)}: member "
                   f"{m.member} (rank {m.rank}, pod {m.pod}) off node {m.node or '?'}")
    return out


def status(args) -> int:
    kube, job = _load(args)
    now = datetime.now(timezone.utc)
    leaders = operator_leaders(kube, now)
    if args.output:
        _emit(args, dict(status_document(job), operator=leaders))
        return 0
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
    print(leader_line(leaders, now))
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
        for pod in _members(pods, name, ps, phase.replicas) if phase.replicas > 1 else ():
            pst = pod.get("status") or {}
            print(f"    member {member_of(pod)}: {pod['metadata']['name']}"
                  f" on {(pod.get('spec') or {}).get('nodeName') or '(not scheduled)'}:"
                  f" {pst.get('phase', '?')}" + (f" ({pst['reason']})" if pst.get("reason") else ""))
        if ps.started_at:
            print(f"  started {_age(ps.started_at, now)}"
                  + (f", finished {_age(ps.completed_at, now)}" if ps.completed_at else ""))
        if ps.resume_from:
            print(f"  resumed from {ps.resume_from}")
        if ps.image_pull is not None:
            print(image_pull_line(ps))
        if ps.last_checkpoint:
            ck = ps.last_checkpoint
            print(f"  last checkpoint: step {ck.step} ({_age(ck.time, now)}) {ck.uri}")
        for line in progress_lines(ps, rec, now):
            print(line)
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


def _members(pods: list[dict], phase: str, ps: Any, replicas: int) -> list[dict]:
    """The current gang's pods by member: survivors of older attempts and former spares
    included (``decide.plan.gang_pods``)."""
    return gang_pods(with_spares(pods_by_phase(pods).get(phase, {}), ps), ps, replicas)


@dataclass
class _PhaseScan:
    phase: str
    uri: str
    error: str | None
    steps: list[int]
    verify: Callable[[int], CheckpointRow]

    def rows(self) -> Iterator[CheckpointRow]:  # lazy: people see each line as it is checked
        return (self.verify(step) for step in self.steps)


def _credentials(kube: Kube, job: dict, spec: JobSpec, endpoint: str | None):
    """How this user reaches the job's storage: the job's Secret (read with the user's own
    Kubernetes rights), else the user's own identity (boto3's default chain)."""
    from phoenix_trainer.core.contract import s3_addressing_style
    from phoenix_trainer.core.storage import Credentials

    ck = spec.checkpoint
    keys = Credentials()
    if ck.credentials_secret:
        keys = kube.s3_credentials(job["metadata"]["namespace"], ck.credentials_secret)
    return replace(keys, endpoint_url=endpoint or ck.endpoint, region=ck.region,
                   addressing_style=s3_addressing_style(ck.addressing_style, ck.endpoint))


def _scan(kube: Kube, job: dict, args) -> Iterator[_PhaseScan]:
    from phoenix_trainer.core.layout import checkpoint_steps, verify_checkpoint
    from phoenix_trainer.core.storage import open_storage

    spec = JobSpec.parse(job["spec"])
    ns = job["metadata"]["namespace"]
    credentials = _credentials(kube, job, spec, args.endpoint)
    statuses = phase_statuses(spec, job.get("status"))
    if args.phase and args.phase not in {p.name for p in spec.phases}:
        raise CliError(f"phoenixjob {ns}/{job['metadata']['name']} has no phase "
                       f"{args.phase!r} (phases: {', '.join(p.name for p in spec.phases)})")
    for name in [args.phase] if args.phase else [p.name for p in spec.phases]:
        uri = spec.checkpoint.phase_uri(name)
        skipped = statuses[name].skipped_steps if name in statuses else ()
        try:
            storage = open_storage(uri, credentials)
            steps = list(reversed(checkpoint_steps(storage)))
        except Exception as e:  # noqa: BLE001 - report and go on with the next phase
            yield _PhaseScan(name, uri, f"{type(e).__name__}: {e}", [], None)
            continue
        yield _PhaseScan(name, uri, None, steps, lambda step, storage=storage, name=name,
                         skipped=skipped: checkpoint_row(
                             name, verify_checkpoint(storage, step, deep=not args.shallow),
                             skipped))


def checkpoints(args) -> int:
    kube, job = _load(args)
    rows: list[CheckpointRow] = []
    errors: list[dict] = []
    for scan in _scan(kube, job, args):
        if not args.output:
            print(f"phase {scan.phase}: {scan.uri}")
        if scan.error:
            errors.append({"phase": scan.phase, "uri": scan.uri, "error": scan.error})
            if not args.output:
                print(f"  cannot list: {scan.error}")
            continue
        if not scan.steps and not args.output:
            print("  (no checkpoints)")
        for row in scan.rows():
            rows.append(row)
            if not args.output:
                print(row.text())
    if args.output:
        _emit(args, checkpoints_document(job, rows, errors))
    bad = len(errors) + sum(not r.valid for r in rows)
    return 1 if bad and args.strict else 0


def reset(args) -> int:
    kube, job = _load(args)
    meta = job["metadata"]
    where = f"{meta['namespace']}/{meta['name']}"
    for _ in range(RESET_ATTEMPTS):
        spec = JobSpec.parse(job["spec"])
        try:
            status, names = reset_status(spec, job.get("status"), args.phase, args.force)
        except ResetRefused as e:
            raise CliError(f"reset {where}: {e}", code=2) from e
        if not names:
            msg = "no Failed or Blocked phase; nothing to reset"
            _report_reset(args, meta, [], msg)
            return 0
        try:
            # Guarded by the resourceVersion we decided on: a concurrent operator write makes
            # this fail (409) and we decide again on the fresh object.
            kube.patch_status(job, status)
        except ApiException as e:
            if e.status != 409:
                raise CliError(f"cannot write status of phoenixjob {where}: "
                               f"{e.status} {e.reason}") from e
            job = kube.get_job(meta["namespace"], meta["name"])
            if job is None:
                raise CliError(f"phoenixjob {where} was deleted")
            continue
        msg = (f"phase {', '.join(names)} reset to Pending by `phoenixctl reset`; budgets cleared, "
               "attempt numbers continue; the operator resumes from the newest valid checkpoint")
        kube.post_event(job, "Normal", C.EV_PHASE_RESET, msg, component="phoenix-cli")
        _report_reset(args, meta, names, msg)
        return 0
    raise CliError(f"phoenixjob {where} kept changing; try again")


def _report_reset(args, meta: dict, names: list[str], msg: str) -> None:
    if args.output:
        _emit(args, {"name": meta["name"], "namespace": meta["namespace"], "reset": names,
                     "message": msg})
    else:
        print(f"PhoenixJob {meta['namespace']}/{meta['name']}: {msg}")


# --- history: report, timeline, logs ------------------------------------------------------


def _history(kube: Kube, job: dict, endpoint: str | None, logs_for: str = "open"):
    """(records, attempt logs) of every phase, read with the user's credentials
    (``phase_storage.read_job_history``)."""
    from . import history
    from .phase_storage import read_job_history

    spec = JobSpec.parse(job["spec"])
    try:
        return read_job_history(spec, credentials=_credentials(kube, job, spec, endpoint),
                                logs_for=logs_for)
    except history.HistoryFormatError as e:
        raise CliError(str(e)) from e
    except CliError:
        raise
    except Exception as e:  # noqa: BLE001 - one line naming the storage and the trouble
        raise CliError(f"cannot read the history of phoenixjob {job['metadata']['name']} at "
                       f"{spec.checkpoint.uri}: {type(e).__name__}: {e}") from e


def report(args) -> int:
    from .report import build_report, render_text

    kube, job = _load(args)
    records, logs = _history(kube, job, args.endpoint)
    meta = job["metadata"]
    doc = build_report(f"{meta['namespace']}/{meta['name']}", records, logs)
    if args.output:
        _emit(args, doc)
    else:
        sys.stdout.write(render_text(doc))
    return 0


def timeline_cmd(args) -> int:
    from . import timeline

    kube, job = _load(args)
    records, logs = _history(kube, job, args.endpoint, logs_for="all")
    meta = job["metadata"]
    now = datetime.now(timezone.utc)
    lanes = timeline.build(records, logs, now)
    title = f"PhoenixJob {meta['namespace']}/{meta['name']}"
    if args.out:
        try:
            timeline.render_image(title, lanes, args.out, now)
        except ImportError as e:
            raise CliError(f"--out needs matplotlib ({e}); install it with "
                           f"{timeline.INSTALL_HINT}") from e
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(timeline.render_text(title, lanes, now))
    return 0


def pod_order(pods: list[dict], phases: list[str]) -> list[dict]:
    """Trainer pods in the order they ran: phase (spec order), attempt, member."""
    def key(p: dict) -> tuple:
        labels = (p.get("metadata") or {}).get("labels") or {}
        phase = labels.get(C.LABEL_PHASE, "")
        try:
            attempt = int(labels.get(C.LABEL_ATTEMPT, "0"))
        except ValueError:
            attempt = 0
        return (phases.index(phase) if phase in phases else len(phases), attempt, member_of(p))
    return sorted(pods, key=key)


def logs(args) -> int:
    kube, job = _load(args)
    meta = job["metadata"]
    spec = JobSpec.parse(job["spec"])
    pods = pod_order(kube.list_pods(meta["namespace"], meta["name"]), [p.name for p in spec.phases])
    shown = 0
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        if args.phase and labels.get(C.LABEL_PHASE) != args.phase:
            continue
        if args.attempt is not None and labels.get(C.LABEL_ATTEMPT) != str(args.attempt):
            continue
        if args.member is not None and member_of(pod) != args.member:
            continue
        name = pod["metadata"]["name"]
        st = pod.get("status") or {}
        print(f"==> {name} (phase {labels.get(C.LABEL_PHASE)}, attempt "
              f"{labels.get(C.LABEL_ATTEMPT)}, member {member_of(pod)}, node "
              f"{(pod.get('spec') or {}).get('nodeName') or '-'}, {st.get('phase', '?')}"
              + (f": {st['reason']}" if st.get("reason") else "") + ") <==", flush=True)
        try:
            text = kube.core.read_namespaced_pod_log(name, meta["namespace"])
        except ApiException as e:
            text = f"(no logs: {e.status} {e.reason})\n"
        sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")
        shown += 1
    if not shown:
        print(f"no kept pods of phoenixjob {meta['namespace']}/{meta['name']} match; pods of "
              "lost nodes and deleted pods take their logs with them ('phoenixctl timeline' "
              "still shows their attempts)")
    return 0


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    prog = prog or program_name(sys.argv[0])
    args = parse_args(sys.argv[1:] if argv is None else argv, prog)
    try:
        return args.fn(args)
    except CliError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return e.code


if __name__ == "__main__":
    sys.exit(main())
