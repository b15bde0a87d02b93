"""One home for every name the operator puts on the cluster.

Group, version, labels, annotations, condition types, event reasons and state names live
here and nowhere else. Environment variable names given to the trainer are not repeated
here: they come from ``phoenix_trainer.core.contract`` (re-exported as ``contract``) so the two
sides of the contract cannot drift.
"""
from __future__ import annotations

from enum import Enum

from phoenix_trainer.core import contract  # noqa: F401  (re-exported: the env var names)

# --- the resource ------------------------------------------------------------------------
GROUP = "phoenix.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "PhoenixJob"
PLURAL = "phoenixjobs"
SINGULAR = "phoenixjob"
SHORT_NAME = "pxj"

# --- labels on trainer pods (selectable; the operator lists pods by these) -------------
LABEL_JOB = f"{GROUP}/job"
LABEL_PHASE = f"{GROUP}/phase"
LABEL_ATTEMPT = f"{GROUP}/attempt"
LABEL_ROLE = f"{GROUP}/role"
LABEL_MEMBER = f"{GROUP}/member"  # a gang member's index (node rank), on gang phases only
# "true" on a pod started as a standby (it keeps the label once promoted). Never adopted as
# a lost attempt: the status names every standby before its pod is created.
LABEL_STANDBY = f"{GROUP}/standby"
# "true" on an in-place gang's spare member (it carries LABEL_STANDBY too, and no
# LABEL_MEMBER: which member it serves, once it takes a place, is PhaseStatus.spare_members).
LABEL_SPARE = f"{GROUP}/spare"
SPARE = "spare"  # StandbyRef.reason of a spare; a spare pod's name ends in ".spare"
# Set by the handler on the last known state of a pod that has been deleted (from the watch's
# DELETED event), so the reason it ended is not lost when the kubelet removes it.
DELETED_KEY = "phoenix.dev/deleted"
# The trainer's readiness endpoint (phoenix_trainer.control.StatusServer) on standby pods.
# spec.checkpoint.caBundle: the ConfigMap or Secret key mounted read-only into the trainer container
CA_BUNDLE_VOLUME = "phoenix-ca-bundle"
CA_BUNDLE_DIR = "/etc/phoenix/ca"
DEFAULT_CA_BUNDLE_KEY = "ca.crt"
STATUS_PORT = 8471
# Seconds before the first readiness probe of a trainer: about the time a trainer takes to
# import torch and build its Session (2-4 s on the lab's 2 CPUs; podspec).
STATUS_PROBE_DELAY_SECONDS = 5
RENDEZVOUS_PORT = 29500  # torchrun's PET_MASTER_PORT inside a gang
# A gang member (gangRestart: Whole) that exited with an error (not a signal, not OOM) while
# its peers still run ends the attempt only this long after, unless they end first: when a
# peer's node vanishes, the others' collectives fail at once, and the node's loss (its Node
# object deleted, or NotReady) may be known only seconds later - then the attempt is that
# peer's preemption, not a failure of the member that saw it (decide.gangs.gang_outcome).
GANG_SETTLE_SECONDS = 15.0
GANG_STORE_PORTS = 1000  # an in-place gang's store: RENDEZVOUS_PORT + attempt % this
PEER_VOLUME = "phoenix-peer"  # an in-place gang's memory-backed emptyDir (contract.PEER_DIR)
ROLE_TRAINER = "trainer"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "phoenix-operator"
# On the operator's leader-election Lease (which it creates): how `phoenixctl status` finds it.
LABEL_OPERATOR_LEASE = f"{GROUP}/operator-lease"
# The operator's pod watch: server-side, only pods that carry the job label.
POD_WATCH_SELECTOR = LABEL_JOB

# --- annotations on trainer pods (facts the operator needs back, not selectable) -------
ANNOTATION_RESUME_FROM = f"{GROUP}/resume-from"
ANNOTATION_RESUME_STEP = f"{GROUP}/resume-step"
ANNOTATION_DELETED_BY = f"{GROUP}/deleted-by"  # set before the operator deletes its own pod

# No finalizer: trainer pods carry owner references, so the garbage collector removes them
# when the PhoenixJob goes, and the operator holds no external state that needs cleanup.
# (Checkpoints in object storage are the user's data and outlive the job on purpose.)
FINALIZER = None

# Name of the single trainer container. Additional user containers (sidecars) are allowed;
# only this one's exit decides the attempt's outcome. Default: the first container.
TRAINER_CONTAINER_ANNOTATION = f"{GROUP}/trainer-container"


class JobPhase(str, Enum):
    """``status.phase`` of a PhoenixJob."""

    PENDING = "Pending"
    RUNNING = "Running"
    RECOVERING = "Recovering"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class PhaseState(str, Enum):
    """``status.phases[].state``: the per-phase state machine (see ``states.py``)."""

    PENDING = "Pending"        # waiting for dependencies
    RUNNING = "Running"        # a trainer pod for the current attempt exists
    RECOVERING = "Recovering"  # the last attempt ended as preemption/failure; replacement due
    SUSPENDED = "Suspended"    # spec.suspend; the pod was (or is being) deleted by us
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"          # a recovery budget ran out
    BLOCKED = "Blocked"        # a dependency failed; this phase will not run


TERMINAL_PHASE_STATES = frozenset({PhaseState.SUCCEEDED, PhaseState.FAILED, PhaseState.BLOCKED})


class Cause(str, Enum):
    """Why a trainer pod ended. Preemptions and failures have separate budgets."""

    COMPLETED = "completed"
    PREEMPTION = "preemption"
    FAILURE = "failure"
    SUSPENDED = "suspended"  # we deleted it for spec.suspend: neither budget is charged


# --- conditions (type names; status True/False/Unknown) -------------------------------
COND_RUNNING = "Running"
COND_RECOVERING = "Recovering"
COND_SUSPENDED = "Suspended"
COND_SUCCEEDED = "Succeeded"
COND_FAILED = "Failed"
# A pod name the job needs is taken by a pod it does not own: nothing is created or deleted
# under that name until it is gone.
COND_POD_CONFLICT = "PodConflict"
# Whether a resume reproduces the uninterrupted run bit for bit, as the trainer reports it
# (termination message, checkpoint manifest); absent until the trainer has said.
COND_RESUME_EXACT = "ResumeExact"
# The checkpoint prefix is held (fence.json) by another PhoenixJob that still exists: no pod
# is started, so two jobs never write into and resume from each other's checkpoints.
COND_PREFIX_CONFLICT = "PrefixConflict"
# A gang rank computes persistently slower than the others (its name, pod and node in the
# message); False once no rank is.
COND_STRAGGLER = "Straggler"
# The status names a checkpoint that storage no longer lists: the phase is not started from
# step 0 until it is listed again (or the job is created anew).
COND_CHECKPOINT_MISSING = "CheckpointMissing"
# A phase's standbys failed MAX_STANDBY_FAILURES times in a row: it keeps none any more.
COND_STANDBY_FAILING = "StandbyFailing"
# The checkpoint storage cannot be listed (no credentials the operator may use, a Secret it
# cannot read, the store down): nothing starts until it can; the message says why.
COND_STORAGE_ERROR = "StorageError"
CONDITION_TYPES = (COND_RUNNING, COND_RECOVERING, COND_SUSPENDED, COND_SUCCEEDED, COND_FAILED,
                   COND_POD_CONFLICT, COND_RESUME_EXACT, COND_PREFIX_CONFLICT,
                   COND_CHECKPOINT_MISSING, COND_STANDBY_FAILING, COND_STORAGE_ERROR)

# --- event reasons (CamelCase, as `kubectl describe` shows them) ----------------------
EV_POD_CREATED = "PodCreated"
EV_POD_ADOPTED = "PodAdopted"
EV_PREEMPTED = "Preempted"
EV_FAILED = "AttemptFailed"
EV_BACKOFF = "BackingOff"
EV_RESUMING = "Resuming"
EV_CHECKPOINT_SKIPPED = "CheckpointSkipped"
EV_CHECKPOINT_FALLBACK = "CheckpointFallback"
EV_PHASE_SUCCEEDED = "PhaseSucceeded"
EV_PHASE_FAILED = "PhaseFailed"
EV_PHASE_BLOCKED = "PhaseBlocked"
EV_BUDGET_EXHAUSTED = "BudgetExhausted"
EV_SUSPENDING = "Suspending"
EV_RESUMED = "Unsuspended"
EV_JOB_SUCCEEDED = "JobSucceeded"
EV_JOB_FAILED = "JobFailed"
EV_STORAGE_ERROR = "StorageError"
EV_PHASE_RESET = "PhaseReset"  # posted by `phoenixctl reset`
EV_POD_CONFLICT = "PodConflict"
EV_PREFIX_CONFLICT = "PrefixConflict"  # another live job holds the checkpoint prefix
EV_CHECKPOINT_MISSING = "CheckpointMissing"  # status names a checkpoint storage does not list
EV_PREFIX_ADOPTED = "PrefixAdopted"  # a deleted job's prefix taken over, attempts above its fence
EV_RESUME_NOT_EXACT = "ResumeNotExact"  # the trainer says a resume will not be bit-exact
EV_GANG_UNSCHEDULABLE = "GangUnschedulable"  # a gang not all scheduled in time: released
EV_NODE_NOT_READY = "NodeNotReady"  # a trainer pod's node NotReady past the grace: stranded
EV_NOTICE = "PreemptionNotice"  # a trainer pod's node announced its reclaim
EV_STANDBY_STARTED = "StandbyStarted"
EV_STANDBY_GIVEN_UP = "StandbyGivenUp"  # MAX_STANDBY_FAILURES in a row: no more standbys
EV_STANDBY_READY = "StandbyReady"
EV_STANDBY_LOST = "StandbyLost"  # a standby ended or was removed before it was needed
EV_HANDOFF = "Handoff"  # the active trainer was asked to hand off to the ready standby
EV_PROMOTED = "StandbyPromoted"
EV_HUNG = "Hung"  # no step for the hang timeout: stacks dumped, the attempt ended
EV_STRAGGLER = "Straggler"  # a gang rank persistently slower than the others
EV_MEMBER_REPLACED = "MemberReplaced"  # gang members replaced in place, the others kept
EV_STRAGGLER_MOVED = "StragglerMoved"  # a straggler's member stopped, to be replaced elsewhere
R_STRAGGLER_MOVED = "StragglerMoved"
MAX_STRAGGLER_MOVES = 3  # per phase: a rank slow wherever it runs is slow code, not a node
STRAGGLER_MOVE_COOLDOWN_SECONDS = 600.0
REASON_NODE_NOT_READY = "NodeNotReady"  # ... and the Running condition's reason meanwhile

# --- classification reasons recorded in status.phases[].lastFailure.reason -------------
R_DISRUPTION_PREFIX = "Disruption"  # + the DisruptionTarget condition's reason
R_EVICTED = "Evicted"
R_NODE_LOST = "NodeLost"
R_NOTICE = "ReclaimNotice"  # killed on a node that announced its reclaim
R_HANDOFF = "HandedOff"  # ended after handing off to a standby, as the operator asked
R_POD_DELETED = "PodDeleted"
R_DELETED_BY_OTHERS = "DeletedExternally"
R_SIGTERM = "SIGTERM"
R_SIGKILL = "SIGKILL"
R_OOM = "OOMKilled"
R_OWN_LIMIT = "LimitExceeded"  # evicted for exceeding its own ephemeral-storage limits
R_OVER_REQUEST = "OverRequest"  # node-pressure eviction of a trainer using more than it requested
R_NEVER_STARTED = "NeverStarted"  # preempted before it ran, too many times in a row
R_HUNG = "Hung"  # Running, but no step completed for the hang timeout: ended by the operator
R_ERROR = "Error"
R_CONFIG_ERROR = "ConfigError"
R_UNKNOWN_EXIT = "UnknownExit"

# A kubelet that refuses a pod for these reasons lost a race for capacity or placement (the
# scheduler saw room that was gone, a label changed): another node may take the pod, so it
# is a preemption. Any other refusal (SysctlForbidden, AppArmor, UnexpectedAdmissionError,
# ...) follows the pod template to every node: a failure.
CAPACITY_REFUSAL_PREFIXES = ("OutOf",)
PLACEMENT_REFUSALS = frozenset({"NodeAffinity", "NodePorts", "NodeName", "Taint",
                                "PodTopologySpread"})
# Preemptions in a row of attempts that never started their trainer before the phase stops
# retrying them as preemptions (each one backs off like a failure before that).
MAX_UNSTARTED_PREEMPTIONS = 5
# A standby that fails is started again after STANDBY_RETRY_INITIAL_SECONDS, doubling up to
# STANDBY_RETRY_MAX_SECONDS; after MAX_STANDBY_FAILURES in a row (none became ready in
# between) the attempt keeps no standby any more (condition StandbyFailing); the next
# attempt tries again. Standbys cost a GPU each: a retry loop without a cap is paid by the hour.
STANDBY_RETRY_INITIAL_SECONDS = 30.0
STANDBY_RETRY_MAX_SECONDS = 600.0
MAX_STANDBY_FAILURES = 5

# Image pulls fail transiently (a registry's hiccup, a cold spot node pulling gigabytes):
# these waiting reasons count only once they last this long after the pod was scheduled (the
# kubelet's own pull back-off tops out at 300 s), then as a failure of their own reason.
IMAGE_PULL_REASONS = frozenset({"ErrImagePull", "ImagePullBackOff"})
IMAGE_PULL_GRACE_SECONDS = 300.0
R_IMAGE_PULL = "ImagePullFailed"
# So does creating the container, and the kubelet retries it: its Secret or ConfigMap cache
# not synced yet ("failed to sync secret cache: timed out waiting for the condition", seen on
# a node whose kubelet had just started), a Secret applied a moment after the job, a runtime
# timeout. Counted (as ConfigError) once they last this long after the pod was scheduled.
CREATE_CONTAINER_REASONS = frozenset({"CreateContainerConfigError", "CreateContainerError"})
CREATE_CONTAINER_GRACE_SECONDS = 60.0
# waiting reason -> how long it may last after scheduling before it counts
WAITING_GRACE_SECONDS = {**{r: IMAGE_PULL_GRACE_SECONDS for r in IMAGE_PULL_REASONS},
                         **{r: CREATE_CONTAINER_GRACE_SECONDS for r in CREATE_CONTAINER_REASONS}}
# Container waiting reasons that will not heal by waiting: charge the failure budget.
FATAL_WAITING_REASONS = frozenset({
    "ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError",
    "CreateContainerError", "CrashLoopBackOff", "RunContainerError",
})

# A live pod's node NotReady (Ready False/Unknown) for longer than this: the job says that
# its pod is stranded (Running condition, one event). It is never replaced for that alone:
# only a deleted Node or the out-of-service taint proves the old trainer is gone.
NODE_NOT_READY_GRACE_SECONDS = 40.0
# The taint Kubernetes' non-graceful node shutdown uses: the node is down, its pods may go.
TAINT_OUT_OF_SERVICE = "node.kubernetes.io/out-of-service"
# Node taints that announce a reclaim (a "notice"), set by the common termination handlers
# and autoscalers; PHOENIX_NOTICE_TAINTS replaces the list (chart: notice.taints).
DEFAULT_NOTICE_TAINTS = (
    "karpenter.sh/disrupted",                               # Karpenter v1
    "karpenter.sh/disruption",                              # Karpenter before v1
    "aws-node-termination-handler/spot-itn",                # AWS NTH: spot interruption
    "aws-node-termination-handler/rebalance-recommendation",
    "aws-node-termination-handler/asg-lifecycle-termination",
    "aws-node-termination-handler/scheduled-maintenance",
    "cloud.google.com/impending-node-termination",          # GKE spot / preemptible
    "ToBeDeletedByClusterAutoscaler",                       # cluster-autoscaler scale-down
    "phoenix.dev/preemption-notice",                        # anything else: set it yourself
)
# Of those, the ones that are advice, not an announced reclaim (AWS: "a spot interruption
# may come"): the trainer is asked to checkpoint now, but no standby is started and nothing
# is handed off - each handoff costs a restart, and advice often comes to nothing.
ADVISORY_NOTICE_TAINTS = frozenset({"aws-node-termination-handler/rebalance-recommendation"})
# Node condition types that announce a reclaim when True (PHOENIX_NOTICE_CONDITIONS).
DEFAULT_NOTICE_CONDITIONS: tuple[str, ...] = ()
ON_NOTICE_HANDOFF, ON_NOTICE_CHECKPOINT, ON_NOTICE_IGNORE = "Handoff", "Checkpoint", "Ignore"

SIGTERM_EXIT = 143
SIGKILL_EXIT = 137

# --- Kubernetes field values ---------------------------------------------------------
DISRUPTION_TARGET = "DisruptionTarget"

# --- metrics -------------------------------------------------------------------------
METRIC_PREFIX = "phoenix"
