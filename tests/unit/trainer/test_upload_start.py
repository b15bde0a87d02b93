"""Where and how the upload process starts and stops (core/storage/upload_proc.py).

A child started from the upload thread while the loop's DataLoader forked its workers ran,
but the ``Popen`` waited for those workers to exit (they inherited the pipe it waits on) -
and the upload, and the loop waiting for that upload at its next checkpoint, for good. So
only ``start()``, on the forking thread, starts it; and ``close()`` tells it to exit rather
than waiting for the end of a pipe a forked worker still holds."""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from phoenix_trainer.core.storage.upload_proc import UploadProcess

pytestmark = pytest.mark.unit



def uploader() -> UploadProcess:
    # Never reaches S3: no object is written, and the client is made only for one.
    return UploadProcess({"endpoint_url": "http://127.0.0.1:9", "access_key": "k",
                          "secret_key": "s", "region": None, "session_token": None,
                          "addressing_style": None}, 5 << 20, 2)


def fork_worker() -> int:
    """A process forked from this one that lives on, as a DataLoader worker, holding every
    pipe it inherited (until the test kills it)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        time.sleep(600)
        os._exit(0)
    return pid


def test_the_upload_thread_never_starts_the_process():
    # Where the race hung a loop (one run in ten of a loaded CI), no fork storm here made it
    # hang on demand; what rules it out is that this thread does not start the child at all.
    up = uploader()
    got: dict = {}
    t = threading.Thread(target=lambda: got.update(writer=up.writer("bucket", "key", 10)))
    t.start()
    t.join(10)
    # Not started there: this object streams from the trainer's own process instead, and
    # the next start() on the loop's thread starts the child.
    assert got["writer"] is None and up.pid() is None and up.dead is None
    up.close()


def test_started_on_the_forking_thread_it_serves_and_close_ends_it_despite_a_worker():
    up = uploader()
    assert up.start() and up.start()  # idempotent
    pid = up.pid()
    assert pid is not None and pid != os.getpid()
    worker = fork_worker()  # forked after the start: holds a copy of the child's input pipe
    try:
        up.close()
        # Told to exit, it did: not killed after close()'s wait for the end of a pipe that
        # only the worker's exit would bring.
        assert up._proc.returncode == 0 and up.pid() is None
    finally:
        os.kill(worker, signal.SIGKILL)
        os.waitpid(worker, 0)


def test_a_dead_child_is_not_restarted_and_uploads_stay_in_process():
    up = uploader()
    assert up.start()
    up._died("killed by the test")
    assert not up.start() and up.pid() is None and up.writer("bucket", "key", 10) is None
