"""How a trainer hears the operator: on any cluster, within a second, with no API access.

The operator never talks to a trainer pod directly (that would need the pod's network to be
reachable from it, or RBAC for the pod to watch its PhoenixJob). It writes two small JSON
objects next to the checkpoints, where the trainer already reads and writes:

- ``<phase prefix>/control.json`` (``layout.Control``): requests to the running attempt —
  "checkpoint now" when its node got a preemption notice, "hand off to attempt N" when a
  ready standby is waiting. ``ControlPoller`` reads it every ``PHOENIX_CONTROL_POLL_SECONDS``
  (default 0.25 s) on a daemon thread and turns it into flags the loop checks at step
  boundaries; nothing is done in the thread itself.
- ``<phase prefix>/fence.json`` (``layout.Fence``): which attempt may write. A standby waits
  until it names the standby's own attempt (``Session.restore`` does the waiting).

The other direction is the pod's readiness: ``StatusServer`` answers ``GET /ready`` (the
readiness probe the operator puts on trainer pods) with 200 once the process is ready to
train — an active trainer after its restore, a standby once it has built its model and
loaded the newest checkpoint — and ``GET /healthz`` with 200 while the process lives.
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from .core.handshake import Control, read_control
from .core.storage import Storage

log = logging.getLogger("phoenix.control")

ERROR_LOG_EVERY_SECONDS = 60.0


class ControlPoller:
    """Reads ``control.json`` for one attempt and calls back on each new request.

    ``on_checkpoint(request_id)`` once per new "checkpoint now" id; ``on_handoff(attempt,
    pod)`` once. Callbacks run on the poller thread: they must only set flags."""

    def __init__(self, storage: Storage, attempt: int, poll_seconds: float, *,
                 on_checkpoint: Callable[[str], None],
                 on_handoff: Callable[[int, str], None], uid: str = "") -> None:
        self.storage, self.attempt, self.poll, self.uid = storage, attempt, poll_seconds, uid
        self.on_checkpoint, self.on_handoff = on_checkpoint, on_handoff
        self.seen_checkpoint = ""
        self.handed_off = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error_log = 0.0

    def start(self) -> "ControlPoller":
        self._thread = threading.Thread(target=self._run, name="phoenix-control", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def poll_once(self) -> Control | None:
        try:
            doc = read_control(self.storage)
        except Exception as e:  # noqa: BLE001 - storage trouble: keep training, say so rarely
            now = time.monotonic()
            if now - self._last_error_log >= ERROR_LOG_EVERY_SECONDS:
                self._last_error_log = now
                log.warning("cannot read %s/control.json (%s: %s); operator requests are not"
                            " heard until it can be read", self.storage.uri, type(e).__name__, e)
            return None
        if doc is None or not doc.for_attempt(self.attempt, self.uid):
            return doc  # another attempt's, or a deleted job's of the same prefix
        if doc.checkpoint_now and doc.checkpoint_now != self.seen_checkpoint:
            self.seen_checkpoint = doc.checkpoint_now
            self.on_checkpoint(doc.checkpoint_now)
        if doc.handoff_to is not None and doc.handoff_to > self.attempt and not self.handed_off:
            self.handed_off = True
            self.on_handoff(doc.handoff_to, doc.handoff_pod)
        return doc

    def _run(self) -> None:
        while not self._stop.wait(self.poll):
            self.poll_once()


# The status port answers probes with a few bytes; it must never be held up by a client: each
# connection gets this long to send its request, and at most this many are served at once
# (more are closed at once; the probe retries within its failureThreshold).
STATUS_CLIENT_TIMEOUT_SECONDS = 2.0
STATUS_MAX_CLIENTS = 8


class _BoundedServer(ThreadingHTTPServer):
    """One thread per connection, at most ``STATUS_MAX_CLIENTS`` of them."""

    daemon_threads = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._slots = threading.BoundedSemaphore(STATUS_MAX_CLIENTS)

    def process_request(self, request, client_address) -> None:
        if not self._slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: drop it rather than queue behind the slow
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class StatusServer:
    """``GET /ready`` (200 once ``ready`` is set, else 503) and ``GET /healthz`` on a port.
    Unauthenticated by design (what it says is public: ready or not); bounded in time and
    threads so that no client can make the pod NotReady; the chart's optional NetworkPolicy
    keeps other pods off it."""

    def __init__(self, port: int, host: str = "") -> None:
        self.ready = threading.Event()
        ready = self.ready

        class Handler(BaseHTTPRequestHandler):
            timeout = STATUS_CLIENT_TIMEOUT_SECONDS  # the socket's: a silent client is dropped

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.startswith("/healthz"):
                    code, body = 200, b"ok\n"
                elif self.path.startswith("/ready"):
                    code, body = (200, b"ready\n") if ready.is_set() else (503, b"not ready\n")
                else:
                    code, body = 404, b"not found\n"
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:  # probes every second: not worth a line
                pass

        self.server = _BoundedServer((host, port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, name="phoenix-status",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving; returns once every thread of the server has ended (a spare's warm
        copy is forked right after, and only from a process without other threads)."""
        self.server.shutdown()
        self.server.server_close()  # joins the connections' threads (block_on_close)
        self._thread.join()

    def close_at_exit(self) -> None:
        """Keep serving until the interpreter exits (the container's end), then close."""
        atexit.register(self.close)


def start_status_server(port: int | None) -> StatusServer | None:
    """The readiness endpoint on ``port``, or None (no port given, or it is taken: logged)."""
    if not port:
        return None
    try:
        return StatusServer(port)
    except OSError as e:
        log.warning("cannot serve readiness on port %d (%s); the pod will not report Ready", port, e)
        return None
