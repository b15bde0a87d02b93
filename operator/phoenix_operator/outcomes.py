"""Tell how a trainer pod ended: completed, preempted or failed. Pure: reads a pod dict.

A preemption is something that happened *to* the pod, shown by the cluster: a
DisruptionTarget condition, an eviction, node loss, deletion by someone else, a reclaim
notice on its node, or a kubelet that lost a race for capacity. It costs the preemption
budget (unlimited by default) and is replaced at once. Everything else is a failure (non-zero
exit, OOMKilled, image or config errors, activeDeadlineSeconds, a kubelet refusal that every
node would repeat, a node-pressure eviction of a trainer using more than it requested); it
costs the failure budget and is replaced after backoff. In particular an exit code of 137/143
alone proves nothing, and neither does the trainer's own "preempted" message (it only says a
SIGTERM arrived): a liveness probe, ``activeDeadlineSeconds`` or a trainer that kills itself
end the same way, and counting them as preemptions would retry them forever. Such an end is
a preemption only when something on the cluster corroborates it (its node is gone, not Ready
or announced its reclaim); otherwise it is a failure. ``Outcome.started`` says whether the
trainer ran at all, for the caller's bound on preemptions that never reach training.

A pod can also be over while the API still shows it live: its Node object is gone, or carries
the ``node.kubernetes.io/out-of-service`` taint (a person or the cloud says the machine is
shut down), so nothing runs it any more and nothing will report its end until pod GC removes
it. ``classify`` takes the node's health as a fact gathered by the caller (``NodeHealth``) and
calls such a pod a ``NodeLost`` preemption that must be force-deleted; it never reads a node
or the clock itself (what a node's state means: ``node_health``). A node that is merely NotReady is *not* enough, whatever its duration:
a partitioned kubelet keeps running the trainer, and a replacement next to it would have two
attempts writing one checkpoint prefix (what Kubernetes itself refuses to do for
StatefulSets). Such a pod stays live; ``stranded`` tells the caller to say so.

Pods are dicts in the API's JSON shape (camelCase), as the API returns them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Mapping

from phoenix_trainer.core.contract import REASON_COMPLETED, REASON_PREEMPTED, TerminationMessage

from . import constants as C
from .constants import DELETED_KEY, Cause
from .node_health import NodeHealth
from .phoenixjob import bounded, parse_ts

MAX_MESSAGE = 512
NODE_GONE_REASONS = frozenset({"NodeLost", "Shutdown", "NodeShutdown", "Terminated"})
KILL_REASONS = {C.SIGTERM_EXIT: C.R_SIGTERM, C.SIGKILL_EXIT: C.R_SIGKILL}
# Pod-level reasons that are the job's own doing, never a disruption.
FAILURE_POD_REASONS = frozenset({"DeadlineExceeded"})  # activeDeadlineSeconds ran out
# The kubelet evicts a pod for exceeding its *own* limits (ephemeral storage, emptyDir size)
# with the same reason, and the same DisruptionTarget condition, as for node pressure; the
# message tells them apart. Retrying such a pod reproduces the eviction: a failure.
_OWN_LIMIT_MARKERS = ("exceeds the total limit", "exceeded its local ephemeral storage limit",
                      "exceeds the limit")


@dataclass(frozen=True)
class Outcome:
    """``cause`` is None while the pod is still live (running, pending or terminating)."""

    cause: Cause | None
    reason: str = ""
    exit_code: int | None = None
    message: str = ""
    finished_at: datetime | None = None
    termination: TerminationMessage | None = None
    delete: bool = False  # the pod is stuck (image/config error): delete it to replace it
    force: bool = False   # ... with grace 0: its node is gone, no process can still run
    started: bool = True  # False: the trainer container never ran (refused, never scheduled)

    @property
    def live(self) -> bool:
        return self.cause is None


LIVE = Outcome(cause=None)


def trainer_container_name(pod: Mapping[str, Any]) -> str | None:
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    if ann.get(C.TRAINER_CONTAINER_ANNOTATION):
        return ann[C.TRAINER_CONTAINER_ANNOTATION]
    containers = (pod.get("spec") or {}).get("containers") or []
    return containers[0].get("name") if containers else None


def _container_status(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    name = trainer_container_name(pod)
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") == name:
            return cs
    return statuses[0] if statuses else {}


def _terminated(cs: Mapping[str, Any]) -> Mapping[str, Any] | None:
    state = cs.get("state") or {}
    if state.get("terminated"):
        return state["terminated"]
    last = cs.get("lastState") or {}
    return last.get("terminated")


def _termination_message(term: Mapping[str, Any] | None) -> TerminationMessage | None:
    text = (term or {}).get("message")
    if not text:
        return None
    try:
        return TerminationMessage.from_json(text)
    except ValueError:  # not ours (or truncated): keep the raw text as the message instead
        return None


def _shorten(text: str) -> str:
    return bounded(" ".join(str(text).split()), MAX_MESSAGE)


def _disruption(pod: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for cond in (pod.get("status") or {}).get("conditions") or ():
        if cond.get("type") == C.DISRUPTION_TARGET and cond.get("status") == "True":
            return cond
    return None


def classify(pod: Mapping[str, Any], nodes: Mapping[str, NodeHealth] | None = None,
             now: datetime | None = None) -> Outcome:
    """How ``pod`` ended, or ``LIVE``. Rules are checked in order; the first match wins.

    ``nodes`` (name -> health) and ``now`` let a pod that still looks live but whose node is
    gone or tainted out-of-service count as a NodeLost preemption."""
    if pod.get(DELETED_KEY):
        return _classify_deleted(pod)
    node = (nodes or {}).get((pod.get("spec") or {}).get("nodeName") or "")
    outcome = _classify(pod, node, now)
    if outcome.live and nodes and now is not None:
        return _on_lost_node(pod, nodes, now) or outcome
    return outcome


def bare_kill(pod: Mapping[str, Any]) -> bool:
    """The trainer ended with 137/143 and nothing else says why: its node's health is what
    decides between preemption and failure, so the caller should gather it."""
    if pod.get(DELETED_KEY) or (pod.get("status") or {}).get("phase") not in ("Failed", "Unknown"):
        return False
    outcome = _classify(pod, None)
    return outcome.reason in (C.R_SIGTERM, C.R_SIGKILL) and outcome.cause == Cause.FAILURE


def _on_lost_node(pod: Mapping[str, Any], nodes: Mapping[str, NodeHealth],
                  now: datetime) -> Outcome | None:
    node = (pod.get("spec") or {}).get("nodeName") or ""
    health = nodes.get(node)
    if not node or health is None or not health.dead:
        return None
    why = (f"node {node} no longer exists" if health.missing else
           f"node {node} is tainted {C.TAINT_OUT_OF_SERVICE}")
    return Outcome(cause=Cause.PREEMPTION, reason=C.R_NODE_LOST, finished_at=now,
                   message=why, delete=True, force=True)


def _classify_deleted(pod: Mapping[str, Any]) -> Outcome:
    """The pod object is gone; judge by its last known state."""
    outcome = _classify({k: v for k, v in pod.items() if k != DELETED_KEY}, None)
    if not outcome.live:
        return outcome
    disruption = _disruption(pod)
    meta = pod.get("metadata") or {}
    cs = _container_status(pod)
    ran = "running" in (cs.get("state") or {}) or _terminated(cs) is not None
    return Outcome(cause=Cause.PREEMPTION, started=ran,
                   reason=(disruption or {}).get("reason") or C.R_POD_DELETED,
                   message=_shorten((disruption or {}).get("message") or
                                    f"pod {meta.get('name', '')} was deleted while running"),
                   finished_at=parse_ts(meta.get("deletionTimestamp")))


def _own_limit(status: Mapping[str, Any]) -> bool:
    text = str(status.get("message") or "").lower()
    return status.get("reason") == "Evicted" and any(m in text for m in _OWN_LIMIT_MARKERS)


# The kubelet's node-pressure eviction message names each container's usage and request.
_USAGE = re.compile(r"Container (\S+) was using (\S+), request is (\S+)")
_QUANTITY = re.compile(r"^([0-9.]+)([a-zA-Z]*)$")
_SUFFIX = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18,
           "Ki": 2 ** 10, "Mi": 2 ** 20, "Gi": 2 ** 30, "Ti": 2 ** 40, "Pi": 2 ** 50,
           "Ei": 2 ** 60, "m": 1e-3, "n": 1e-9, "u": 1e-6}


def _quantity(text: str) -> float | None:
    m = _QUANTITY.match(text.strip().rstrip(",."))
    if m is None or m.group(2) not in _SUFFIX:
        return None
    return float(m.group(1)) * _SUFFIX[m.group(2)]


def _over_request(pod: Mapping[str, Any], status: Mapping[str, Any]) -> str | None:
    """The trainer's usage above its request, if a node-pressure eviction says so: evicting
    the container that exceeds its request most is how the kubelet picks, so the same
    template on any node under the same load is evicted again."""
    if status.get("reason") != "Evicted":
        return None
    trainer = trainer_container_name(pod)
    for name, using, request in _USAGE.findall(str(status.get("message") or "")):
        used, asked = _quantity(using), _quantity(request)
        if name == trainer and used is not None and asked is not None and used > asked:
            return (f"container {name} was using {using}, above its request of {request}; "
                    "raise the request (or lower the usage) in the pod template")
    return None


def _refused(pod_phase: str, status: Mapping[str, Any]) -> bool:
    """The kubelet refused the pod at admission for a reason every node would repeat."""
    reason = str(status.get("reason") or "")
    return bool(reason) and not reason.startswith(C.CAPACITY_REFUSAL_PREFIXES) and \
        reason not in C.PLACEMENT_REFUSALS and reason not in NODE_GONE_REASONS and \
        reason != "Evicted" and pod_phase == "Failed"


def waiting_grace_left(pod: Mapping[str, Any], now: datetime | None) -> float | None:
    """Seconds until a waiting reason of ``pod`` that may heal (an image pull, creating the
    container: ``C.WAITING_GRACE_SECONDS``) counts as a failure (None: no such reason, or no
    clock). Counted from the pod's scheduling (its creation, if that is not recorded)."""
    cs = _container_status(pod)
    waiting = (cs.get("state") or {}).get("waiting") or {}
    grace = C.WAITING_GRACE_SECONDS.get(waiting.get("reason"))
    if now is None or grace is None:
        return None
    status = pod.get("status") or {}
    since = next((parse_ts(c.get("lastTransitionTime")) for c in status.get("conditions") or ()
                  if c.get("type") == "PodScheduled" and c.get("status") == "True"), None)
    since = since or parse_ts((pod.get("metadata") or {}).get("creationTimestamp"))
    if since is None:
        return None
    return grace - (now - since).total_seconds()


def _classify(pod: Mapping[str, Any], node: NodeHealth | None,
              now: datetime | None = None) -> Outcome:
    status = pod.get("status") or {}
    meta = pod.get("metadata") or {}
    pod_phase = status.get("phase") or "Pending"
    cs = _container_status(pod)
    term = _terminated(cs)
    tmsg = _termination_message(term)
    exit_code = term.get("exitCode") if term else None
    finished = parse_ts((term or {}).get("finishedAt")) or parse_ts(meta.get("deletionTimestamp"))
    raw_msg = _shorten(tmsg.message if tmsg and tmsg.message else (term or {}).get("message", ""))

    def out(cause: Cause, reason: str, message: str = "", delete: bool = False) -> Outcome:
        return Outcome(cause=cause, reason=reason, exit_code=exit_code,
                       message=_shorten(message) if message else raw_msg,
                       finished_at=finished, termination=tmsg, delete=delete)

    if pod_phase == "Succeeded":
        return out(Cause.COMPLETED, "Completed")

    if pod_phase in ("Pending", "Running"):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in C.FATAL_WAITING_REASONS and not meta.get("deletionTimestamp"):
            what = f"{waiting['reason']}: {waiting.get('message', '')}"
            left = waiting_grace_left(pod, now)
            if left is not None and left > 0:
                return LIVE  # it may heal (the caller looks again when the grace ends)
            if waiting["reason"] in C.IMAGE_PULL_REASONS:
                return Outcome(cause=Cause.FAILURE, reason=C.R_IMAGE_PULL, delete=True,
                               started=False, message=_shorten(
                                   f"{what} (still failing {C.IMAGE_PULL_GRACE_SECONDS:g}s after "
                                   "the pod was scheduled: check the image name, the registry "
                                   "and imagePullSecrets)"))
            if waiting["reason"] in C.CREATE_CONTAINER_REASONS and left is not None:
                what += (f" (still failing {C.CREATE_CONTAINER_GRACE_SECONDS:g}s after the pod was"
                         " scheduled: check the Secrets and ConfigMaps the pod template names)")
            return Outcome(cause=Cause.FAILURE, reason=C.R_CONFIG_ERROR, message=_shorten(what),
                           delete=True, started=False)
        return LIVE

    # Failed or Unknown from here on: the attempt is over.
    if _own_limit(status):
        return out(Cause.FAILURE, C.R_OWN_LIMIT, status.get("message", ""))
    over = _over_request(pod, status)
    if over:
        return out(Cause.FAILURE, C.R_OVER_REQUEST,
                   f"evicted under node pressure: {over}; {status.get('message', '')}")
    if status.get("reason") in FAILURE_POD_REASONS:
        return out(Cause.FAILURE, status["reason"], status.get("message", ""))
    disruption = _disruption(pod)
    if disruption:
        return out(Cause.PREEMPTION, disruption.get("reason") or C.DISRUPTION_TARGET,
                   disruption.get("message", ""))
    if status.get("reason") == "Evicted":
        return out(Cause.PREEMPTION, C.R_EVICTED, status.get("message", ""))
    if status.get("reason") in NODE_GONE_REASONS or pod_phase == "Unknown":
        return out(Cause.PREEMPTION, C.R_NODE_LOST, status.get("message", ""))
    if term and term.get("reason") == "OOMKilled":
        return out(Cause.FAILURE, C.R_OOM)
    if meta.get("deletionTimestamp"):
        return out(Cause.PREEMPTION, C.R_DELETED_BY_OTHERS)
    if tmsg and tmsg.reason == REASON_PREEMPTED:
        # The trainer only knows a SIGTERM came; who sent it is the cluster's to say.
        return _killed(out, exit_code if exit_code in KILL_REASONS else C.SIGTERM_EXIT, node,
                       raw_msg, said_preempted=True)
    if exit_code in KILL_REASONS:
        return _killed(out, exit_code, node, raw_msg)
    if exit_code == 0 and (tmsg is None or tmsg.reason == REASON_COMPLETED):
        return out(Cause.COMPLETED, "Completed")
    if term is None:
        # Failed without the trainer ever running: the node refused the pod at admission.
        # Lost a race for capacity (OutOfnvidia.com/gpu): another node will do, a preemption.
        # Anything else (SysctlForbidden, AppArmor, ...) every node repeats: a failure.
        reason = status.get("reason")
        if reason and not _refused(pod_phase, status):
            return replace(out(Cause.PREEMPTION, reason, status.get("message", "")),
                           started=False)
        if reason:
            return replace(out(Cause.FAILURE, reason,
                               f"the node's kubelet refused the pod ({reason}: "
                               f"{status.get('message', '')}); every node would: fix the pod "
                               "template (sysctls, AppArmor/seccomp profiles, device requests)"),
                           started=False)
        return replace(out(Cause.FAILURE, C.R_UNKNOWN_EXIT, "pod failed without a container exit"),
                       started=False)
    return out(Cause.FAILURE, C.R_ERROR)


def _killed(out, exit_code: int, node: NodeHealth | None, raw_msg: str,
            said_preempted: bool = False) -> Outcome:
    """137/143 with no DisruptionTarget and no deletion (``said_preempted``: the trainer
    caught the SIGTERM and reported "preempted"): a preemption only if the node corroborates
    it."""
    reason = KILL_REASONS[exit_code]
    if node is not None and not node.healthy:
        state = "gone" if node.missing else "not Ready"
        return out(Cause.PREEMPTION, C.R_NODE_LOST,
                   f"exit code {exit_code} ({reason}) while its node was {state}")
    if node is not None and node.notice:
        return out(Cause.PREEMPTION, C.R_NOTICE,
                   f"exit code {exit_code} ({reason}) on a node that announced its reclaim"
                   f" ({node.notice})")
    said = (" (the trainer caught it, saved and reported 'preempted', but only the cluster can"
            " say who sent it)" if said_preempted else "")
    why = (f"exit code {exit_code} ({reason}){said} with no sign of a disruption (no "
           "DisruptionTarget condition, not deleted, node healthy and no reclaim notice): a "
           "liveness probe, activeDeadlineSeconds or the trainer itself killed it")
    return out(Cause.FAILURE, reason, f"{why}; {raw_msg}" if raw_msg else why)


def gone(pod_name: str) -> Outcome:
    """The pod of a running attempt no longer exists: someone deleted it (or pod GC after
    node loss). Treated as a preemption."""
    return Outcome(cause=Cause.PREEMPTION, reason=C.R_POD_DELETED,
                   message=f"pod {pod_name} was deleted before the operator saw it finish")
