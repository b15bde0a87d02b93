"""A running attempt that stopped making progress, and a gang rank that holds the others back.

Read from the attempt's heartbeats (``core.heartbeat``; ``gather`` reads them, this module
only judges). Per rank, the timeout is ``core.heartbeat.watch_timeout``: the spec's
``recovery.hangTimeoutSeconds``, else ten times the rank's 95th-percentile step time with a
3-minute floor, and 10 minutes for a restore; a process starting, waiting as a standby or
finishing is not watched. When a watched rank has made no progress for its timeout, the
attempt is *hung*: the operator waits until every rank that still runs has written its stack
dump (each writes one on reaching the timeout) or ``DUMP_GRACE_SECONDS`` have passed (a
frozen process writes none), then records ``lastHang`` (the rank that stopped first, the
dumps), posts a ``Hung`` event and deletes the attempt's pods with a short grace (a hung loop
cannot run its emergency save). When they are gone, ``attempts.account`` charges the attempt
to the failure budget with reason ``Hung`` - a hang is treated like a crash: the same budget,
backoff and checkpoint fallback - and a replacement resumes from the newest valid checkpoint.

Which rank stopped first: the one furthest behind (lowest step); among equals, one that has
not entered the step's collective (the others wait in it for this one: a rank known to wait
there did not stop first), then a frozen one (its heartbeat stopped being rewritten: SIGSTOP,
a frozen cgroup - or storage that stalls its writes), then the longest stalled.

Stragglers: with two ranks or more, ``core.heartbeat.stragglers`` compares each rank's compute
time before its first collective per step (not the wall time every rank shares); a straggler
is recorded in ``progress.stragglers``, which raises the ``Straggler`` condition and its event.
"""
from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

from .. import constants as C
from ..constants import PhaseState
from ..phoenixjob import Hang, Move, PhaseSpec, PhaseStatus, ProgressRef, Straggler
from ..podspec import in_place_gang, member_of
from .plan import Ctx, PhaseProgress, Pods, RankProgress, gang_pods
from phoenix_trainer.core.heartbeat import DUMP_GRACE_SECONDS, stragglers, watch_timeout

# The status's progress is rewritten only when the last step moved this much (or stragglers
# changed): one status write per running job per minute at most, not one per heartbeat.
PROGRESS_REFRESH_SECONDS = 60.0
# A running phase is looked at again this often (its heartbeats read, stragglers named), or
# sooner: at the earliest moment a rank could reach its timeout (none can be hung before).
WATCH_SECONDS = 30.0
# A hung process cannot run its SIGTERM handler (the main thread is blocked): no long grace.
HUNG_GRACE_SECONDS = 2


def watch(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    """The running attempt: record its progress, name stragglers, end it if it is hung."""
    rec = ctx.spec.recovery
    if not rec.hang_detection or st.state != PhaseState.RUNNING:
        return st
    if st.last_hang is not None and st.last_hang.attempt == st.attempts:
        return st  # already being ended
    prog = ctx.progress.get(phase.name)
    if prog is None or prog.error or prog.attempt != st.attempts:
        return st
    ctx.plan.requeue(WATCH_SECONDS)  # also while no heartbeat was written yet
    if not prog.ranks:
        return st
    ctx.plan.rank_times[phase.name] = [(r.rank, r.step_p50, r.compute_p50) for r in prog.ranks]
    watched = [(r, t) for r in prog.ranks
               if (t := watch_timeout(rec.hang_timeout, r.step_p95, r.activity)) is not None]
    st = _record_progress(ctx, st, prog, watched)
    st = _move_straggler(ctx, phase, st, pods)
    hung = [(r, t) for r, t in watched if r.stalled >= t]
    if not hung:
        soonest = min((t - r.stalled for r, t in watched), default=None)
        if soonest is not None:
            ctx.plan.requeue(max(1.0, soonest))
        return st
    over = max(r.stalled - t for r, t in hung)
    waiting = [r for r, _ in watched if not r.frozen and not r.stack_dump]
    if waiting and over < DUMP_GRACE_SECONDS:
        ctx.plan.requeue(min(5.0, DUMP_GRACE_SECONDS - over))
        return st
    first, timeout = stopped_first(watched)
    hang = Hang(attempt=st.attempts, time=ctx.now, step=first.step, stalled_seconds=first.stalled,
                timeout_seconds=timeout, rank=first.rank, pod=first.pod,
                stack_dumps=tuple(r.stack_dump for r in sorted(prog.ranks, key=lambda r: r.rank)
                                  if r.stack_dump))
    ctx.note("Warning", C.EV_HUNG,
             f"phase {phase.name} attempt {st.attempts} is hung: {hang.describe()}; ending the "
             "attempt (a failure, reason Hung) and resuming from the newest valid checkpoint")
    live = [p for p in gang_pods(pods, st, phase.replicas) if ctx.outcome(p).live]
    ctx.delete_live(live, C.R_HUNG, HUNG_GRACE_SECONDS)
    return replace(st, last_hang=hang, hangs=st.hangs + 1)


def _move_straggler(ctx: Ctx, phase: PhaseSpec, st: PhaseStatus, pods: Pods) -> PhaseStatus:
    """``onStraggler: Replace``: stop the slowest straggler's pod (its grace: the trainer
    leaves the gang at its next step, its peers keep the state); ``decide.members`` replaces
    the member in place off that node, without charging a preemption. One move at a time, at
    most ``MAX_STRAGGLER_MOVES`` per phase, ``STRAGGLER_MOVE_COOLDOWN_SECONDS`` apart."""
    rec = ctx.spec.recovery
    found = st.progress.stragglers if st.progress is not None else ()
    if rec.on_straggler != "Replace" or not found or not in_place_gang(ctx.spec, phase):
        return st
    last = st.last_move
    if last is not None and (last.attempt >= st.attempts or (ctx.now - last.time).total_seconds()
                             < C.STRAGGLER_MOVE_COOLDOWN_SECONDS):
        return st  # one in progress, or too soon after the last
    if st.straggler_moves >= C.MAX_STRAGGLER_MOVES:
        return st
    slow = max(found, key=lambda s: s.compute_seconds / max(s.others_seconds, 1e-9))
    pod = next((p for p in gang_pods(pods, st, phase.replicas)
                if p["metadata"]["name"] == slow.pod and ctx.outcome(p).live), None)
    if pod is None:
        return st
    move = Move(attempt=st.attempts, time=ctx.now, member=member_of(pod), rank=slow.rank,
                pod=slow.pod, node=slow.node, why=slow.describe())
    ctx.note("Normal", C.EV_STRAGGLER_MOVED,
             f"phase {phase.name}: moving gang member {move.member} off node {slow.node or '?'}"
             f": {slow.describe()}; its pod stops and the member is replaced on another node,"
             " its peers keep the state (not a preemption)")
    ctx.delete_live([pod], C.R_STRAGGLER_MOVED)
    return replace(st, last_move=move)


def stopped_first(watched: list[tuple[RankProgress, float]]) -> tuple[RankProgress, float]:
    """The rank that stopped first. Where the gang says who waits in the step's collective
    (a rank reports it: DDP's exact all-reduce hook), a rank still writing heartbeats that is
    not waiting there holds the others back (furthest behind first). Otherwise a frozen rank
    (it cannot even write: stopped, or its process wedged) before the others, then the
    furthest behind. A frozen heartbeat's step is only where the rank was when it last wrote,
    so it is not compared with a fresh one's first: ranks waiting in a collective can stop
    writing too (seen on the lab: their storage writes stalled)."""
    known = any(r.in_collective for r, _ in watched)
    fresh_out = [rt for rt in watched if not rt[0].frozen and not rt[0].in_collective]
    if known and fresh_out:
        return min(fresh_out, key=lambda rt: (rt[0].step, -rt[0].stalled, rt[0].rank))
    return min(watched, key=lambda rt: (not rt[0].frozen, rt[0].step, rt[0].in_collective,
                                        -rt[0].stalled, rt[0].rank))


def _record_progress(ctx: Ctx, st: PhaseStatus, prog: PhaseProgress,
                     watched: list[tuple[RankProgress, float]]) -> PhaseStatus:
    ranks = [r for r, _ in watched] or list(prog.ranks)
    slowest = max(ranks, key=lambda r: r.stalled)
    timeout = max((t for r, t in watched if r is slowest), default=None)
    found = _stragglers(prog)
    new = ProgressRef(attempt=prog.attempt, step=min(r.step for r in ranks),
                      last_step_time=ctx.now - timedelta(seconds=slowest.stalled),
                      hang_timeout=timeout, step_seconds=slowest.step_p50, stragglers=found)
    old = st.progress
    if (old is not None and old.attempt == new.attempt
            and [s.rank for s in old.stragglers] == [s.rank for s in new.stragglers]
            and _close(old.hang_timeout, new.hang_timeout)
            and (new.last_step_time - old.last_step_time).total_seconds() < PROGRESS_REFRESH_SECONDS):
        return st
    return replace(st, progress=new)


def _close(a: float | None, b: float | None) -> bool:
    """Timeouts within 10 % of each other (the p95 behind a default one moves every read)."""
    if a is None or b is None:
        return a is b
    return abs(a - b) <= 0.1 * max(a, b)


def _stragglers(prog: PhaseProgress) -> tuple[Straggler, ...]:
    compute = {r.rank: r.compute_p50 for r in prog.ranks if r.compute_p50 is not None}
    slow = stragglers(compute, {r.rank: r.steps_timed for r in prog.ranks})
    by_rank = {r.rank: r for r in prog.ranks}
    out = []
    for rank in slow:
        others = sorted(v for k, v in compute.items() if k != rank)
        mid = others[len(others) // 2]
        r = by_rank[rank]
        out.append(Straggler(rank=rank, pod=r.pod, node=r.node, compute_seconds=compute[rank],
                             others_seconds=mid))
    return tuple(out)
