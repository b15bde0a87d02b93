"""With S3 down, the trainer still tells the operator how it ended: the termination message is
written before the (synchronous) metrics upload, which can hang until the kubelet's SIGKILL.

"Down" here is the bad kind of outage: an endpoint that accepts connections and never answers
(a partition, a wedged load balancer), so every request waits for botocore's read timeout.
"""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from phoenix_trainer.core.contract import TrainerEnv
from phoenix_trainer.core.storage.file import LocalStorage
from phoenix_trainer.core.storage.s3 import S3Storage
from phoenix_trainer.testing import tiny_setup
from phoenix_trainer.trainer import Callback, Trainer

pytestmark = pytest.mark.storage


class Blackhole:
    """A TCP endpoint on loopback that accepts and never replies."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.conns: list[socket.socket] = []
        self.accepted = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        # shutdown, not just close: a close does not wake the thread blocked in accept(),
        # which keeps the socket listening.
        for s in (self.listener, *self.conns):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


class PreemptThenLoseS3(Callback):
    """SIGTERM at ``step``; once the emergency checkpoint is committed (to local storage),
    the metrics object's store becomes the unreachable S3 endpoint."""

    def __init__(self, step: int, s3: S3Storage) -> None:
        self.step, self.s3 = step, s3

    def on_step_end(self, trainer, loss):
        if trainer.step == self.step:
            trainer.request_stop()

    def on_checkpoint(self, trainer, info):
        if info.step == self.step:
            trainer.metrics.storage = self.s3


def test_termination_message_is_written_while_s3_hangs(tmp_path):
    hole = Blackhole()
    s3 = S3Storage("bucket", "run/train", endpoint_url=hole.url, access_key="k",
                   secret_key="s")
    log = tmp_path / "termination-log"
    t = tiny_setup(total_steps=40)
    trainer = Trainer(t.model, t.optimizer, t.loader, t.loss_fn, scheduler=t.scheduler,
                      max_steps=40, config=t.config, storage=LocalStorage(tmp_path / "ckpt"),
                      env=TrainerEnv(phase="train", termination_log=str(log), grace_seconds=30),
                      install_signal_handlers=False, callbacks=[PreemptThenLoseS3(12, s3)])
    result: list = []
    runner = threading.Thread(target=lambda: result.append(trainer.fit()), daemon=True)
    runner.start()
    try:
        assert hole.accepted.wait(60), "the metrics upload never reached the S3 endpoint"
        deadline = time.monotonic() + 10
        while not log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        # The upload is still hanging (botocore's 60 s read timeout) and the message is out.
        assert runner.is_alive()
        assert log.exists(), "no termination message while the metrics upload hangs"
        message = json.loads(log.read_text())
        assert message["reason"] == "preempted" and message["step"] == 12
        assert message["emergencySaveCompleted"] is True
        assert message["checkpoint"].endswith("step-0000000012")
    finally:
        hole.close()  # the upload fails now (connection reset, then refused)
    runner.join(60)
    assert result and result[0].exit_code == 143
