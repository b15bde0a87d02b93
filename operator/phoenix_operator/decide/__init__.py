"""The operator's brain: ``decide(job, pods, checkpoints, now) -> Plan``.

Pure: no API calls, no clock reads, no globals. The handler gathers the facts (the job as
the API returns it, the job's pods listed by label, checkpoint listings it verified in
storage, the health of the nodes its live pods are bound to, the time), calls ``decide`` and applies the plan: create pods, delete pods, post
events, write status. Running ``decide`` twice on the same facts gives the same plan; running
it on the facts left by a half-applied plan (operator killed between creating a pod and
writing status) finishes the job instead of repeating it, because pod names are
deterministic and pods newer than the status are adopted, never duplicated.

Pod creation is intent-first: the plan's status (naming the new pod, guarded by the job's
resourceVersion) is written before the pod is created, so an operator acting on a stale view
loses the write and creates nothing. A status that names a pod with no ``podUID`` and no pod
means "not created yet" and the same pod is created again; a recorded ``podUID`` whose pod is
gone means the pod was deleted (a preemption).

If a decision needs checkpoint listings the caller did not pass, the plan says so in
``needs_checkpoints`` and holds back that phase's pod; the caller lists them and calls again.
Why two passes and not one: listing and verifying a prefix costs storage reads (every
manifest, with deep verification every shard), and only a phase that starts or replaces an
attempt needs them - most passes (a running pod's event, a resync) need none. Which phases
need them is known only by deciding (a pod just ended; a standby is promoted; a dependency
just succeeded in this very pass), so asking for them up front would mean duplicating the
decision's logic in the caller; deciding twice on the same facts is cheap and pure, and the
second pass sees exactly what the first asked for.

A gang phase (``replicas`` > 1) runs each attempt as that many pods, created together (with
their headless Service). The attempt is one unit: it is live while every member is, it
succeeds when every member has, and the first member to end otherwise ends it — a member
that was preempted is the cause before any that failed (its peers fail only because they lost
it) — and the live members are deleted with their grace before the next attempt. One
preemption or failure is counted, naming that member. A gang not fully scheduled within
``recovery.gangScheduleTimeoutSeconds`` is released (its pods deleted, no budget charged) and
tried again after the same time.

Standbys and notices. A standby is the phase's next attempt started ahead of need: its pod
(a gang's: all its members, a *standby gang*) is created (status first, as always) but the
storage fence is not moved, so it waits (see ``phoenix_trainer.control``). A standby gang is
one unit like an active gang: ready when every member is, lost when any member ends, released
when not all scheduled in time, promoted with one fence write. When the active attempt ends, the
standby is *promoted* instead of a pod being created: the fence moves to it, naming the
checkpoint to resume from, and that is its signal to start. ``recovery.standby`` keeps one
standby per running phase (off the active pod's node). A *notice* is a taint or condition on
the active pod's node announcing its reclaim: the trainer is asked for a checkpoint now
(``control.json``), and with ``onNotice: Handoff`` a standby is started on another node; once
it reports Ready the trainer is asked to hand off: it saves a final checkpoint at the next
step boundary, fences the phase for the standby naming that checkpoint, and exits as
preempted. One writer at all times: only the fence's attempt may publish checkpoints.

The package, by concern: ``plan`` (the facts it reads, the plan it returns, ``Ctx``),
``phases`` (the per-phase state machine: a dispatch table from state to handler),
``attempts`` (an attempt's outcome, budgets, resume point, fence floor, new pods),
``gangs`` (a gang's outcome and all-or-nothing scheduling), ``standby`` (standbys and
notices), ``hangs`` (an attempt that stopped making progress, stragglers), ``status`` (the job's status and conditions). ``decide`` below walks the phases.
"""
from __future__ import annotations

from datetime import datetime
from typing import Any, Mapping, Sequence

from .. import constants as C
from ..constants import JobPhase
from ..image_pull import record as record_pull
from ..node_health import NodeHealth
from ..phoenixjob import ImagePull, JobSpec, phase_statuses
from .phases import decide_phase
from .plan import (AttemptEnd, Checkpoint, ControlWrite, CreatePod, Ctx, DeletePod, Listing,
                   Note, PhaseProgress, Plan, Promote, RankProgress, Recovery, pods_by_phase)
from .status import failure_summary, job_status

__all__ = ["AttemptEnd", "Checkpoint", "ControlWrite", "CreatePod", "DeletePod", "Listing", "Note",
           "PhaseProgress", "Plan", "Promote", "RankProgress", "Recovery", "decide"]


def decide(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]],
           checkpoints: Mapping[str, Listing], now: datetime,
           nodes: Mapping[str, NodeHealth] | None = None,
           foreign: Mapping[str, str] | None = None, spec: JobSpec | None = None,
           progress: Mapping[str, PhaseProgress] | None = None,
           pulls: Mapping[str, ImagePull] | None = None) -> Plan:
    """``nodes``: health of the nodes the job's live pods are bound to, by name (missing
    names count as healthy). ``foreign``: pod names the status wants that are taken by pods
    this job does not own, with who owns them. ``spec``: ``job["spec"]`` as the caller
    already parsed it (once per pass); parsed here when not given. ``pulls``: image pulls
    read from the kubelet's events this pass, by pod name (``image_pull.wanted``)."""
    meta = job.get("metadata") or {}
    spec = spec if spec is not None else JobSpec.parse(job.get("spec") or {})
    old = dict(job.get("status") or {})
    statuses = phase_statuses(spec, old)
    ctx = Ctx(job=meta["name"], namespace=meta.get("namespace") or "default",
              uid=str(meta.get("uid") or ""), spec=spec,
              checkpoints=checkpoints, now=now, plan=Plan(status={}), nodes=nodes or {},
              foreign=foreign or {}, progress=progress or {})
    grouped = pods_by_phase(pods)
    # Spec order: a phase that succeeds in this pass lets its dependents start in the same pass.
    for phase in spec.phases:
        statuses[phase.name] = decide_phase(ctx, phase, statuses[phase.name],
                                            grouped.get(phase.name, {}), statuses)
        statuses[phase.name] = record_pull(statuses[phase.name], pulls or {})
    ctx.plan.status = job_status(ctx, statuses, old, meta.get("generation"))
    new_phase = ctx.plan.status["phase"]
    if new_phase != old.get("phase"):
        if new_phase == JobPhase.SUCCEEDED.value:
            ctx.note("Normal", C.EV_JOB_SUCCEEDED, "all phases succeeded")
        elif new_phase == JobPhase.FAILED.value:
            ctx.note("Warning", C.EV_JOB_FAILED, failure_summary(spec, statuses))
    return ctx.plan
