"""In-place gang recovery (``recovery.gangRestart: Member``): survivors keep their pods, their
state, and rejoin a new process group around the replacement of a lost member.

Three parts, used by ``distributed.py`` and the session:

- ``GangMember`` / ``init_group``: the GLOBAL process group of a Member-mode gang. torchrun
  runs standalone in each pod (it only knows the pod's local ranks); the global rank is
  ``member * LOCAL_WORLD_SIZE + LOCAL_RANK`` and the group meets at this attempt's c10d
  TCPStore (``PHOENIX_GANG_STORE``, hosted by local rank 0 of ``PHOENIX_GANG_STORE_MEMBER``).
  Every rank first checks in on the store and waits, with a generous bound, for all of them,
  so survivors wait for a replacement pod that is still being scheduled without tripping the
  (short) collective timeout.
- ``PeerState``: every ``PHOENIX_PEER_SNAPSHOT_STEPS`` steps (default 1), after the step's
  agreement, each rank writes the session's state to ``PHOENIX_PEER_DIR`` (memory-backed,
  survives a re-exec), with every rank's small per-rank entries (RNG, data position), keeping
  the 2 newest. After a rejoin, ``restore`` finds the newest step every holder has and
  broadcasts it from the lowest holder to the ranks that have nothing (the newcomer): 0 steps
  lost. Only replicated state (plain tensors: DDP) is taken from peers; sharded state
  (DTensor: FSDP2) is restored from the newest checkpoint as before.
- ``Rejoin``: a collective error in the user's loop (a peer is gone) does not end the
  process: it polls ``fence.json`` for a fence that carries this pod into a newer attempt and
  hands that attempt to its warm copy (``warm.py``: a fork made before the group, which goes
  on from ``init_from_env``; the PID torchrun started stays, as its supervisor), or without
  one re-execs the same command line (same PID: torchrun's agent notices nothing). Either
  way the script builds the model again, joins the new group and restores from peers. A
  fence that moves on without this pod: exit as superseded; SIGTERM while waiting: exit as
  preempted; no fence within ``PHOENIX_REJOIN_TIMEOUT_SECONDS``: fail with the original
  error. Any other exception (a bug) fails the process as before.

- ``take_place``: a spare member (``PHOENIX_ROLE=spare``, with ``recovery.standby``) waits
  before the group exists, with torch and the script's imports loaded and its readiness
  served, until a fence of its job names its pod in ``members``; it then becomes that
  member of the fence's attempt (its environment says so from then on) and joins the group
  like any newcomer, its state coming from the survivors. A fence of another job: exit as
  superseded; SIGTERM (the operator removing it): exit as preempted. Its wait has no
  clock bound of its own: the operator ends it (invariant 3: a spare that fails is retried
  with backoff and a cap, ``decide.standby.standby_failed``).

Never writes to checkpoint storage (reads the fence only); never runs in a signal handler.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist

from . import warm
from .checkpoint import TRAINER_DOC
from .core.contract import (
    ENV_ATTEMPT,
    ENV_CHECKPOINT_URI,
    EXIT_PREEMPTED,
    ENV_GANG_MEMBER,
    ENV_GANG_MEMBERS,
    ENV_GANG_RESTART,
    ENV_GANG_STORE,
    ENV_GANG_STORE_MEMBER,
    ENV_JOB_UID,
    ENV_POD_NAME,
    ENV_RESUME_FROM,
    ENV_ROLE,
    ENV_STATUS_PORT,
    GANG_RESTART_MEMBER,
    ROLE_ACTIVE,
    ROLE_SPARE,
)
from .core.handshake import Fence, read_fence
from .core.layout import CheckpointInfo, split_checkpoint_uri
from .core.repeated import RepeatedFailure
from .core.storage import Storage, open_storage
from .restore import Restored

log = logging.getLogger("phoenix.rejoin")

ENV_PEER_SNAPSHOT_STEPS = "PHOENIX_PEER_SNAPSHOT_STEPS"  # default 1; 0: no peer snapshots
ENV_REJOIN_TIMEOUT = "PHOENIX_REJOIN_TIMEOUT_SECONDS"  # how long a survivor waits for a fence
ENV_GANG_JOIN_TIMEOUT = "PHOENIX_GANG_JOIN_TIMEOUT_SECONDS"  # how long ranks wait for each other
# Set by a survivor for its next self (warm copy or re-exec): when it lost the group, which
# attempt it left.
ENV_REJOIN_LOST_AT = "PHOENIX_REJOIN_LOST_AT"
ENV_REJOIN_FROM_ATTEMPT = "PHOENIX_REJOIN_FROM_ATTEMPT"

DEFAULT_REJOIN_TIMEOUT = 300.0
DEFAULT_GANG_JOIN_TIMEOUT = 900.0
FENCE_POLL_SECONDS = 0.5
JOIN_POLL_SECONDS = 5.0  # while a gang gathers, the fence is looked at this often
KEEP_SNAPSHOTS = 2  # a failure between two ranks' writes: the holders share the older one
SHARDED = "sharded"

RESTORED_PEERS, RESTORED_CHECKPOINT, RESTORED_NONE = "peers", "checkpoint", "none"

# What a lost peer looks like to a collective (gloo, NCCL, the c10d store), besides
# torch.distributed's own DistError types. Matched in the message of the exception or of
# anything it was raised from.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "Connection refused", "Timed out waiting", "timed out", "Socket Timeout",
              "[gloo", "gloo/", "NCCL", "ProcessGroup", "DistBackendError", "Connection timed out")


def _env_float(environ: Mapping[str, str], name: str, default: float) -> float:
    raw = environ.get(name)
    try:
        return float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


# ----------------------------------------------------------------------- the group --------
@dataclass(frozen=True)
class GangMember:
    """This process's place in a Member-mode gang, from the pod's environment."""

    members: int
    member: int
    local_rank: int
    local_world_size: int
    store_host: str
    store_port: int
    store_member: int
    attempt: int
    pod: str = ""

    @property
    def rank(self) -> int:
        return self.member * self.local_world_size + self.local_rank

    @property
    def world_size(self) -> int:
        return self.members * self.local_world_size

    @property
    def hosts_store(self) -> bool:
        return self.member == self.store_member and self.local_rank == 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "GangMember | None":
        """None unless ``PHOENIX_GANG_RESTART=Member`` with ``PHOENIX_GANG_MEMBERS`` set."""
        environ = os.environ if environ is None else environ
        if environ.get(ENV_GANG_RESTART) != GANG_RESTART_MEMBER or not environ.get(ENV_GANG_MEMBERS):
            return None

        def num(name: str, default: str | None = None) -> int:
            raw = environ.get(name, default)
            try:
                return int(raw)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise ValueError(f"{name}={raw!r}: an in-place gang needs an integer here") from None

        store = environ.get(ENV_GANG_STORE, "")
        host, _, port = store.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{ENV_GANG_STORE}={store!r}: expected host:port of the gang's store")
        me = cls(members=num(ENV_GANG_MEMBERS), member=num(ENV_GANG_MEMBER),
                 local_rank=num("LOCAL_RANK", "0"), local_world_size=num("LOCAL_WORLD_SIZE", "1"),
                 store_host=host, store_port=int(port), store_member=num(ENV_GANG_STORE_MEMBER, "0"),
                 attempt=num(ENV_ATTEMPT, "0"), pod=environ.get(ENV_POD_NAME, ""))
        if not 0 <= me.member < me.members:
            raise ValueError(f"{ENV_GANG_MEMBER}={me.member} is outside the gang of {me.members}")
        return me


def init_group(me: GangMember, backend: str, timeout: timedelta,
               environ: Mapping[str, str] | None = None, storage: Storage | None = None) -> None:
    """The global process group of this attempt (see the module docstring); sets RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT to the global values for libraries that read them.

    While the ranks gather, the fence is watched (``storage``: the phase's prefix, opened from
    ``PHOENIX_CHECKPOINT_URI`` when not given): a member lost while the gang was still joining
    moves the fence on, and a rank carried into that newer attempt moves into it at once
    (a newcomer started for an attempt already superseded skips it); one the fence no longer
    carries exits as superseded. Without this the others would wait for the lost one until
    the join timeout."""
    environ = os.environ if environ is None else environ
    join = _env_float(environ, ENV_GANG_JOIN_TIMEOUT, DEFAULT_GANG_JOIN_TIMEOUT)
    if storage is None and environ.get(ENV_CHECKPOINT_URI):
        storage = open_storage(environ[ENV_CHECKPOINT_URI])
    t0 = time.monotonic()
    _follow_fence(me, storage)
    store = None
    while store is None:  # the host may still be starting, or gone: look at the fence between
        try:
            store = dist.TCPStore(me.store_host, me.store_port, None, me.hosts_store,
                                  timedelta(seconds=JOIN_POLL_SECONDS), wait_for_workers=False)
        except (RuntimeError, OSError, ValueError) as e:  # DistNetworkError, timeouts
            if time.monotonic() - t0 > join:
                raise
            log.info("the gang's store %s:%d is not there yet (%s); looking at the fence",
                     me.store_host, me.store_port, str(e).splitlines()[0][:120] if str(e) else "")
            _follow_fence(me, storage)
    store.set_timeout(timedelta(seconds=join))
    prefixed = dist.PrefixStore(f"phoenix/attempt-{me.attempt}/", store)
    prefixed.set(f"joined/{me.rank}", me.pod or "?")
    # Everyone checked in before the group's own (collective-timeout bounded) handshake.
    keys = [f"joined/{r}" for r in range(me.world_size)]
    while True:
        try:
            prefixed.wait(keys, timedelta(seconds=JOIN_POLL_SECONDS))
            break
        except (RuntimeError, OSError) as e:
            if time.monotonic() - t0 > join:
                raise RuntimeError(f"the gang's {me.world_size} ranks did not all join attempt"
                                   f" {me.attempt} within {join:.0f}s") from e
            _follow_fence(me, storage)
    os.environ.update({"RANK": str(me.rank), "WORLD_SIZE": str(me.world_size),
                       "MASTER_ADDR": me.store_host, "MASTER_PORT": str(me.store_port)})
    dist.init_process_group(backend, store=prefixed, rank=me.rank, world_size=me.world_size,
                            timeout=timeout)
    log.info("rank %d/%d (member %d, local rank %d) joined attempt %d's group at %s:%d in %.2fs",
             me.rank, me.world_size, me.member, me.local_rank, me.attempt, me.store_host,
             me.store_port, time.monotonic() - t0)


def _follow_fence(me: GangMember, storage: Storage | None) -> None:
    """A fence newer than this rank's attempt: move into it if it carries this pod, exit
    as superseded if not; else return (the gang is still gathering for this attempt)."""
    if storage is None or not me.pod:
        return
    try:
        fence = read_fence(storage)
    except Exception as e:  # noqa: BLE001 - a storage blip: look again at the next poll
        log.warning("cannot read the fence while joining (%s: %s)", type(e).__name__, e)
        return
    if fence is None or fence.attempt <= me.attempt:
        return
    if fence.carries(me.pod, me.member):
        log.info("attempt %d was superseded while its gang joined; attempt %d carries pod %s:"
                 " joining that one", me.attempt, fence.attempt, me.pod)
        reexec_into(fence, time.time(), me.attempt)
    log.warning("attempt %d was superseded by attempt %d, which does not carry pod %s; exiting",
                me.attempt, fence.attempt, me.pod)
    raise SystemExit(EXIT_PREEMPTED)


# ----------------------------------------------------------------------- the wait ---------
def is_collective_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it was raised from) is a collective that lost a peer."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, getattr(dist, "DistError", ())):
            return True
        if isinstance(e, (RuntimeError, OSError)) or type(e).__name__ == "CheckpointError":
            text = str(e)
            if any(m in text for m in _PEER_GONE):
                return True
        e = e.__cause__ or e.__context__
    return False


CARRIED, SUPERSEDED, STOPPED, TIMED_OUT = "carried", "superseded", "stopped", "timed-out"


def wait_for_fence(storage: Storage, *, attempt: int, member: int, pod: str,
                   stopped: Callable[[], bool], timeout: float, poll: float = FENCE_POLL_SECONDS,
                   clock: Callable[[], float] = time.monotonic,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[str, Fence | None]:
    """Poll the fence until it carries ``pod`` (serving ``member``) into an attempt newer than
    ``attempt`` (CARRIED), moves past it without it (SUPERSEDED), ``stopped()`` (STOPPED) or
    ``timeout`` seconds pass (TIMED_OUT). Bounded by construction; a read error is retried."""
    deadline = clock() + timeout
    while True:
        if stopped():
            return STOPPED, None
        try:
            fence = read_fence(storage)
        except Exception as e:  # noqa: BLE001 - storage blips: keep polling until the bound
            log.warning("cannot read the fence (%s: %s); retrying", type(e).__name__, e)
            fence = None
        if fence is not None and fence.attempt > attempt:
            return (CARRIED if fence.carries(pod, member) else SUPERSEDED), fence
        if clock() >= deadline:
            return TIMED_OUT, fence
        sleep(poll)


# --------------------------------------------------------------------- the spare ----------
# Set for the member a spare became: when it was named, and the attempt its pod was made for.
ENV_SPARE_TOOK_PLACE_AT = "PHOENIX_SPARE_TOOK_PLACE_AT"
ENV_SPARE_WAITED = "PHOENIX_SPARE_WAITED_SECONDS"


def is_spare(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is an in-place gang's spare still waiting for a place."""
    environ = os.environ if environ is None else environ
    return ((environ.get(ENV_ROLE) or "").strip().lower() == ROLE_SPARE
            and environ.get(ENV_GANG_RESTART) == GANG_RESTART_MEMBER)


def wait_for_place(storage: Storage, *, pod: str, uid: str, stopped: Callable[[], bool],
                   poll: float = FENCE_POLL_SECONDS,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[str, Fence | None]:
    """Poll the fence until one of this job names ``pod`` in ``members`` (CARRIED), one of
    another job holds the prefix (SUPERSEDED), or ``stopped()`` (STOPPED). A fence that moves
    on without naming it (a member replaced by a new pod) is no concern of a spare's: it
    keeps waiting. A read error is retried (warned about once per 30 s while it lasts)."""
    reads = RepeatedFailure(log, "spare: reading the fence")
    while True:
        if stopped():
            return STOPPED, None
        try:
            fence = read_fence(storage)
            reads.succeeded()
        except Exception as e:  # noqa: BLE001 - storage blips: keep polling
            reads.failed(e)
            fence = None
        if fence is not None and uid and fence.uid and fence.uid != uid:
            return SUPERSEDED, fence
        if fence is not None and pod and pod in fence.members:
            return CARRIED, fence
        sleep(poll)


def place_env(fence: Fence, pod: str, now: float, waited: float) -> dict[str, str]:
    """The environment of the member ``fence`` makes of the spare ``pod``: its index, the
    fence's attempt and store, an active role, and the checkpoint to fall back on."""
    env = {ENV_GANG_MEMBER: str(fence.members.index(pod)), ENV_ATTEMPT: str(fence.attempt),
           ENV_GANG_STORE: fence.store, ENV_GANG_STORE_MEMBER: str(fence.store_member),
           ENV_ROLE: ROLE_ACTIVE, ENV_SPARE_TOOK_PLACE_AT: f"{now:.3f}",
           ENV_SPARE_WAITED: f"{waited:.3f}"}
    if fence.resume_from:
        env[ENV_RESUME_FROM] = fence.resume_from
    return env


def take_place(environ: Any = None, storage: Storage | None = None,
               poll: float = FENCE_POLL_SECONDS) -> int:
    """A spare's wait (module docstring); returns the member it became, with ``environ``
    (default ``os.environ``) updated for it (``place_env``). Serves its readiness meanwhile
    (local rank 0), and ends that server before returning: the session serves it next."""
    import signal

    from .control import start_status_server

    environ = os.environ if environ is None else environ
    pod = environ.get(ENV_POD_NAME, "")
    if not pod:
        raise ValueError(f"a spare needs {ENV_POD_NAME} (the pod's name, which a fence names)")
    if storage is None:
        if not environ.get(ENV_CHECKPOINT_URI):
            raise ValueError(f"a spare needs {ENV_CHECKPOINT_URI} (it waits on the phase's fence)")
        storage = open_storage(environ[ENV_CHECKPOINT_URI])
    server = None
    if environ.get("LOCAL_RANK", "0") == "0" and environ.get(ENV_STATUS_PORT, "").isdigit():
        server = start_status_server(int(environ[ENV_STATUS_PORT]))
        if server is not None:
            server.ready.set()  # warm: interpreter up, torch and the script's imports loaded
    stop: list[int] = []
    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    except ValueError:  # not the main thread: SIGTERM keeps its default
        pass
    t0 = time.monotonic()
    log.info("spare pod %s: waiting for a member's place (polling %s every %.2fs)", pod,
             storage.uri, poll)
    try:
        outcome, fence = wait_for_place(storage, pod=pod, uid=environ.get(ENV_JOB_UID, ""),
                                        stopped=lambda: bool(stop), poll=poll)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if server is not None:
            server.close()
    if outcome == STOPPED:
        log.info("spare pod %s: stopped (SIGTERM) before it took a place", pod)
        raise SystemExit(EXIT_PREEMPTED)
    if outcome == SUPERSEDED:
        assert fence is not None
        log.warning("spare pod %s: the prefix is held by job %s now; exiting", pod,
                    fence.job or fence.uid)
        raise SystemExit(EXIT_PREEMPTED)
    assert fence is not None
    waited = time.monotonic() - t0
    environ.update(place_env(fence, pod, time.time(), waited))
    member = fence.members.index(pod)
    log.info("spare pod %s takes member %d's place in attempt %d (store %s) after %.1fs warm",
             pod, member, fence.attempt, fence.store, waited)
    return member


def reexec_into(fence: Fence, lost_at: float, old_attempt: int) -> None:
    """Become this attempt's member (never returns): hand the attempt to this process's warm
    copy (``warm.py``; the PID torchrun started stays, as the copy's supervisor), or, without
    one, execute the same command line again (same PID)."""
    os.environ.update({ENV_ATTEMPT: str(fence.attempt), ENV_GANG_STORE: fence.store,
                       ENV_GANG_STORE_MEMBER: str(fence.store_member),
                       ENV_REJOIN_LOST_AT: f"{lost_at:.3f}",
                       ENV_REJOIN_FROM_ATTEMPT: str(old_attempt),
                       warm.ENV_REJOIN_HOW: warm.HOW_REEXEC})
    copy = warm.current()
    log.info("attempt %d: %s", fence.attempt,
             f"handing it to this process's warm copy (pid {copy.pid})" if copy else
             "re-executing the command line")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    _close_on_exec()
    if copy is not None:
        warm.hand_over(copy, os.environ)  # returns only if the copy could not take it
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    os.execv(sys.executable, argv)


def _close_on_exec() -> None:
    """Every descriptor but stdin/out/err closes at the exec: the old group's sockets (c10d
    and gloo mark theirs inheritable) would otherwise stay open in the new image, and a peer
    waiting on one would learn of the re-exec only at its collective timeout."""
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass


class Rejoin:
    """A session's part: what a Member-mode rank does when a collective loses a peer."""

    def __init__(self, me: GangMember, storage: Storage | None, *, timeout: float | None = None,
                 log_: logging.Logger | logging.LoggerAdapter = log) -> None:
        self.me, self.storage, self.log = me, storage, log_
        self.timeout = timeout if timeout is not None else _env_float(
            os.environ, ENV_REJOIN_TIMEOUT, DEFAULT_REJOIN_TIMEOUT)

    def applies(self, exc: BaseException) -> bool:
        return self.storage is not None and is_collective_error(exc)

    def wait(self, exc: BaseException, stopped: Callable[[], bool]) -> tuple[str, Fence | None]:
        """Wait for the fence that carries this pod; move into that attempt if it comes (does
        not return then). Otherwise the outcome: SUPERSEDED, STOPPED or TIMED_OUT."""
        assert self.storage is not None
        lost_at = time.time()
        me = self.me
        self.log.warning("a collective lost a peer (%s: %s); member %d (pod %s) waits up to %.0fs"
                         " for the attempt that replaces it", type(exc).__name__,
                         str(exc).splitlines()[0][:300] if str(exc) else "", me.member,
                         me.pod or "?", self.timeout)
        outcome, fence = wait_for_fence(self.storage, attempt=me.attempt, member=me.member,
                                        pod=me.pod, stopped=stopped, timeout=self.timeout)
        if outcome == CARRIED:
            assert fence is not None
            self.log.info("carried into attempt %d (store %s on member %d) %.2fs after the loss;"
                          " rejoining", fence.attempt, fence.store, fence.store_member,
                          time.time() - lost_at)
            reexec_into(fence, lost_at, me.attempt)
        return outcome, fence


# ----------------------------------------------------------------------- peer state -------
def is_replicated(tree: Any) -> bool:
    """No DTensor (or other tensor subclass) anywhere: every rank holds all of it."""
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return False
    if isinstance(tree, torch.Tensor):
        return type(tree) is torch.Tensor or isinstance(tree, torch.nn.Parameter)
    if isinstance(tree, Mapping):
        return all(is_replicated(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return all(is_replicated(v) for v in tree)
    return True


@dataclass(frozen=True)
class _Slot:
    """A tensor's place in a broadcast tree: its bytes are ``[offset, offset+nbytes)``."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _pack(tree: Any, chunks: list[torch.Tensor], offset: list[int]) -> Any:
    if isinstance(tree, torch.Tensor):
        t = tree.detach().to("cpu").contiguous()
        raw = t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8)
        slot = _Slot(offset[0], raw.numel(), t.dtype, tuple(t.shape))
        chunks.append(raw)
        offset[0] += raw.numel()
        return slot
    if isinstance(tree, Mapping):
        return {k: _pack(v, chunks, offset) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_pack(v, chunks, offset) for v in tree)
    return tree


def _unpack(skeleton: Any, buf: torch.Tensor) -> Any:
    if isinstance(skeleton, _Slot):
        raw = buf[skeleton.offset:skeleton.offset + skeleton.nbytes].clone()
        return raw.view(skeleton.dtype).reshape(skeleton.shape)
    if isinstance(skeleton, Mapping):
        return {k: _unpack(v, buf) for k, v in skeleton.items()}
    if isinstance(skeleton, (list, tuple)):
        return type(skeleton)(_unpack(v, buf) for v in skeleton)
    return skeleton


def fill(target: Any, source: Any) -> None:
    """Copy ``source`` into ``target`` in place: tensors of the same shape are copied into,
    anything else replaced (a state dict's optimizer ``param_groups``, step counters)."""
    for k, v in source.items():
        cur = target.get(k) if isinstance(target, dict) else None
        if isinstance(v, Mapping) and isinstance(cur, dict):
            fill(cur, v)
        elif (isinstance(v, torch.Tensor) and isinstance(cur, torch.Tensor)
              and cur.shape == v.shape):
            with torch.no_grad():
                cur.copy_(v)
        else:
            target[k] = v


def broadcast_tree(tree: Any, src: int, group: Any, rank: int) -> Any:
    """``tree`` (on ``src``) on every rank: its structure pickled, its tensors' bytes in one
    uint8 buffer (one broadcast whatever the dtypes; gloo on CPU)."""
    head: list[Any] = [None]
    chunks: list[torch.Tensor] = []
    if rank == src:
        size = [0]
        head[0] = (_pack(tree, chunks, size), size[0])
    dist.broadcast_object_list(head, src=src, group=group)
    skeleton, total = head[0]
    buf = torch.cat(chunks) if rank == src and chunks else torch.empty(total, dtype=torch.uint8)
    if total:
        dist.broadcast(buf, src=src, group=group)
    return _unpack(skeleton, buf)


class PeerRestored(Restored):
    """State at a step the survivors reached: per-rank entries from the lowest holder's
    snapshot, the ``"sharded"`` state broadcast from it by ``load_sharded`` (collective)."""

    source = RESTORED_PEERS
    bytes_read: int = 0

    def __init__(self, step: int, epoch: int, state: dict[str, Any], *, src: int, rank: int,
                 group: Any, path: str | None) -> None:
        info = CheckpointInfo(step, f"peers:step-{step}", None, True, "restored from peers")
        super().__init__("resume", step, epoch, info, state)
        self.src, self.rank, self.group, self.path = src, rank, group, path

    def load_sharded(self, target: Any, *, process_group: Any = None, read: Any = None) -> None:
        t0 = time.perf_counter()
        tree = None
        if self.rank == self.src:
            assert self.path is not None
            tree = torch.load(self.path, map_location="cpu", weights_only=False)[SHARDED]
        got = broadcast_tree(tree, self.src, self.group, self.rank)
        fill(target, got)
        log.info("sharded state of step %d from rank %d's peer snapshot in %.3fs", self.step,
                 self.src, time.perf_counter() - t0)


def _snapshot_name(step: int) -> str:
    return f"peer-step-{step:010d}"


class PeerState:
    """Peer snapshots of this rank's state and the restore from them (module docstring).

    ``peers`` is the group's ``distributed.GroupPeers`` (ctl gloo group, rank, world size)."""

    def __init__(self, peers: Any, directory: str, *, every: int | None = None,
                 log_: logging.Logger | logging.LoggerAdapter = log) -> None:
        self.peers, self.dir, self.log = peers, directory, log_
        self.every = every if every is not None else int(_env_float(
            os.environ, ENV_PEER_SNAPSHOT_STEPS, 1))
        self.disabled = self.every <= 0
        self.last_step: int | None = None
        self.seconds: list[float] = []  # per snapshot, for the cost
        os.makedirs(self.dir, exist_ok=True)

    # --- writing (the loop's step boundary, after the agreement) ---------------------------
    def snapshot(self, step: int, state: Callable[[], Mapping[str, Any]], doc: dict[str, Any]) -> None:
        if self.disabled or step == self.last_step or step % self.every:
            return
        self.last_step = step
        t0 = time.perf_counter()
        entries = dict(state())
        sharded = entries.pop(SHARDED, None)
        # The same verdict on every rank (the state's kind does not differ between ranks).
        if not is_replicated(sharded):
            self.disabled = True
            self.log.info("the state is sharded (DTensor): no peer snapshots; a replaced member"
                          " restores from the newest checkpoint")
            return
        everyone = self.peers.gather(entries)  # every rank's small per-rank entries
        payload = {SHARDED: sharded, "ranks": everyone}
        name = _snapshot_name(step)
        tmp = os.path.join(self.dir, f".{name}.{os.getpid()}.tmp")
        torch.save(payload, tmp)
        os.replace(tmp, os.path.join(self.dir, name + ".pt"))
        head = dict(doc, step=step, worldSize=self.peers.world_size)
        with open(tmp, "w") as f:
            json.dump(head, f)
        os.replace(tmp, os.path.join(self.dir, name + ".json"))  # last: the snapshot exists
        for old in self._held()[:-KEEP_SNAPSHOTS]:
            for ext in (".json", ".pt"):
                try:
                    os.unlink(os.path.join(self.dir, _snapshot_name(old) + ext))
                except FileNotFoundError:
                    pass
        self.seconds.append(time.perf_counter() - t0)

    def _held(self) -> list[int]:
        out = []
        for path in glob.glob(os.path.join(self.dir, "peer-step-*.json")):
            try:
                out.append(int(os.path.basename(path)[len("peer-step-"):-len(".json")]))
            except ValueError:
                continue
        return sorted(out)

    def _usable(self, fingerprint: str, phase: str) -> list[int]:
        steps = []
        for step in self._held():
            try:
                with open(os.path.join(self.dir, _snapshot_name(step) + ".json")) as f:
                    head = json.load(f)
            except (OSError, ValueError):
                continue
            if (head.get("configFingerprint") == fingerprint and head.get("phase") == phase
                    and head.get("worldSize") == self.peers.world_size
                    and os.path.exists(os.path.join(self.dir, _snapshot_name(step) + ".pt"))):
                steps.append(step)
        return steps

    # --- restoring (collective: every rank of the group calls it) --------------------------
    def restore(self, *, fingerprint: str, phase: str, resume_from: str | None) -> PeerRestored | None:
        """The state at the newest step every holder has, if it is not older than the newest
        checkpoint any rank was told to resume from; else None (restore from storage)."""
        floor = split_checkpoint_uri(resume_from)[1] if resume_from else None
        mine = (self._usable(fingerprint, phase), floor or 0)
        said = self.peers.gather(mine)
        holders = [r for r, (steps, _) in enumerate(said) if steps]
        if not holders:
            return None
        common = set(said[holders[0]][0]).intersection(*(set(said[r][0]) for r in holders[1:]))
        newest_checkpoint = max(f for _, f in said)
        usable = [s for s in common if s >= newest_checkpoint]
        if not usable:
            self.log.warning("peer snapshots %s do not reach the newest checkpoint (step %d) or"
                             " have no step in common; restoring from storage",
                             [s for s, _ in said], newest_checkpoint)
            return None
        step, src = max(usable), holders[0]
        rank = self.peers.rank
        path = os.path.join(self.dir, _snapshot_name(step) + ".pt") if rank == src else None
        carried: list[Any] = [None]
        if rank == src:
            assert path is not None
            with open(os.path.join(self.dir, _snapshot_name(step) + ".json")) as f:
                head = json.load(f)
            ranks = torch.load(path, map_location="cpu", weights_only=False)["ranks"]
            carried[0] = (head, ranks)
        dist.broadcast_object_list(carried, src=src, group=self.peers.ctl_group)
        head, ranks = carried[0]
        state = dict(ranks[rank])
        state[TRAINER_DOC] = {"step": step, "epoch": head.get("epoch", 0),
                              "runId": head.get("runId", ""), "progress": head.get("progress") or {}}
        self.last_step = step  # this step's snapshot is the one restored: not written again
        self.log.info("restoring step %d from peers (lowest holder rank %d; holders %s)", step,
                      src, holders)
        return PeerRestored(step, int(head.get("epoch", 0)), state, src=src, rank=rank,
                            group=self.peers.ctl_group, path=path)


def rejoin_record(environ: Mapping[str, str] | None = None,
                  now: Callable[[], float] = time.time) -> dict[str, Any]:
    """For a survivor that rejoined: which attempt it left, how long ago it lost the group and
    how it came back (``how``: ``warm``, a copy made before the group; ``re-exec``), for its
    start log and metrics record; empty for a process that did not rejoin."""
    environ = os.environ if environ is None else environ
    raw = environ.get(ENV_REJOIN_LOST_AT)
    if not raw:
        return {}
    try:
        lost = float(raw)
    except ValueError:
        return {}
    return {"fromAttempt": int(environ.get(ENV_REJOIN_FROM_ATTEMPT) or 0), "lostAt": lost,
            "secondsSinceLoss": round(now() - lost, 3),
            "how": environ.get(warm.ENV_REJOIN_HOW) or warm.HOW_REEXEC}
