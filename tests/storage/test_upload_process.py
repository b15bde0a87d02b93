"""Streamed uploads run in a helper process by default (core/storage/upload_proc.py): a
checkpoint saved through it is the same checkpoint (verified by HEAD, loaded bit-exact),
the trainer's own client sends none of the shards' requests, the credentials reach the
child through its pipe only, a failure there is a StorageError here, and a child that dies
mid-upload costs a retry in the trainer's process, not the checkpoint."""
from __future__ import annotations

import os
import signal

import pytest
import torch

from phoenix_trainer.checkpoint import AsyncCheckpointer, Snapshot, load_checkpoint
from phoenix_trainer.core.errors import StorageError
from phoenix_trainer.core.layout import latest_valid_checkpoint, verify_checkpoint
from phoenix_trainer.core.storage import Credentials, open_storage
from phoenix_trainer.core.writer import RetryPolicy, StreamedShard, stream_object

pytestmark = pytest.mark.storage
MiB = 1 << 20


@pytest.fixture
def storage(s3_bucket, monkeypatch):
    monkeypatch.setenv("PHOENIX_S3_PART_MB", "5")
    monkeypatch.setenv("PHOENIX_S3_CONCURRENCY", "2")
    monkeypatch.delenv("PHOENIX_UPLOAD_PROCESS", raising=False)  # the default: on
    ep = s3_bucket.endpoint
    st = open_storage(f"{s3_bucket.uri}/job/train", Credentials(
        endpoint_url=ep.url, access_key=ep.access_key, secret_key=ep.secret_key))
    st.prepare_uploads()  # as a checkpointer's save does, on the thread that forks workers
    yield st
    st.uploader.close()


def state(seed: int):
    g = torch.Generator().manual_seed(seed)
    return {"model.pt": {"w": torch.randn(3 * MiB, generator=g)},  # 12 MiB: 3 parts
            "optimizer.pt": {"m": torch.randn(MiB // 4, generator=g)}}  # 1 MiB: one PUT


def test_a_checkpoint_uploads_through_the_child_and_is_the_same_checkpoint(storage, s3_bucket,
                                                                           tmp_path):
    ops: list[str] = []
    storage.client.meta.events.register("before-call.s3", lambda model, **kw: ops.append(model.name))
    ck = AsyncCheckpointer(storage, phase="train", config_fingerprint="fp", spool_dir=str(tmp_path))
    tensors = state(1)
    ck.save(Snapshot.take(10, 0, tensors, {"trainer.json": {"step": 10}})).result()
    pid = storage.uploader.pid()
    assert pid is not None and pid != os.getpid() and storage.uploader.dead is None
    # The upload thread's nice (+10), not lower: the loop waits for its uploads (in flight,
    # at the end), and a child at 19 was starved on loaded cores until a loop stalled.
    assert os.getpriority(os.PRIO_PROCESS, pid) == min(19, os.getpriority(os.PRIO_PROCESS, 0) + 10)
    # The shards went out from the child; the trainer's client wrote only the manifest.
    assert not {"CreateMultipartUpload", "UploadPart", "CompleteMultipartUpload"} & set(ops)
    assert ops.count("PutObject") == 1
    # The credentials reached the child through its pipe: not its command line, not its env.
    secret = s3_bucket.endpoint.secret_key.encode()
    for what in ("cmdline", "environ"):
        with open(f"/proc/{pid}/{what}", "rb") as f:
            assert secret not in f.read()

    info = verify_checkpoint(storage, 10, deep=True)
    assert info.valid and info.manifest.files["model.pt"].stored_checksum.endswith("-3")
    loaded = load_checkpoint(storage, latest_valid_checkpoint(storage, deep=True))
    for name, shard in tensors.items():
        for k, t in shard.items():
            assert torch.equal(loaded[name][k], t)
    ck.close()


def test_a_failure_in_the_child_is_a_storage_error_and_the_child_serves_the_next(storage,
                                                                                 s3_bucket):
    ep = s3_bucket.endpoint
    nowhere = open_storage(f"{s3_bucket.uri}/x", Credentials(  # a key the store refuses
        endpoint_url=ep.url, access_key=ep.access_key, secret_key="not-" + ep.secret_key))
    nowhere.prepare_uploads()
    try:
        with pytest.raises(StorageError, match="upload process"):
            stream_object(nowhere, "k", StreamedShard(lambda f: f.write(os.urandom(12 * MiB))))
        assert nowhere.uploader.pid() is not None and nowhere.uploader.dead is None
        with pytest.raises(StorageError, match="upload process"):  # a small one: one PUT
            stream_object(nowhere, "k", StreamedShard(lambda f: f.write(b"x")))
    finally:
        nowhere.uploader.close()
    entry = stream_object(storage, "ok", StreamedShard(lambda f: f.write(b"fine")))
    assert entry.size == 4 and entry.confirmed


def test_a_child_killed_mid_upload_costs_a_retry_here_not_the_checkpoint(storage, tmp_path):
    killed = []

    def killing_save(obj, f):  # the first attempt kills the child half-way through its bytes
        data = os.urandom(11 * MiB)
        f.write(data[:6 * MiB])
        if not killed:
            killed.append(storage.uploader.pid())
            os.kill(killed[0], signal.SIGKILL)
        f.write(data[6 * MiB:])

    sleeps: list[float] = []
    entry = RetryPolicy(attempts=2, sleep=sleeps.append).run(
        "stream", lambda: stream_object(storage, "step-1/model.pt",
                                        StreamedShard(lambda f: killing_save(None, f))))
    assert killed and len(sleeps) == 1 and entry.size == 11 * MiB
    assert storage.uploader.dead and "ended mid-upload" in storage.uploader.dead
    assert storage.size("step-1/model.pt") == 11 * MiB  # uploaded from this process
    # From now on every upload stays here.
    assert type(storage.open_write("k2")).__name__ == "_S3StreamWriter"
