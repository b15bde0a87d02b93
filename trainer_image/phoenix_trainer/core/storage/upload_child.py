"""The upload process's side of ``upload_proc``: read objects from stdin, upload each with
the same ``s3._S3StreamWriter`` an in-process upload uses, answer on stdout.

Started by ``upload_proc.UploadProcess`` as ``python -m`` this module; its first message is
the client's settings (credentials included: they travel over the pipe only). It lowers its
priority as the upload thread does (``PHOENIX_CHECKPOINT_NICE`` below the thread that
started it) and exits when told to or at the end of its input, aborting an upload left open.
Never imports torch.
"""
from __future__ import annotations

import json
import signal
import sys
from typing import IO

from ..contract import checkpoint_nice, lower_thread_priority
from .s3 import S3Storage, default_transfer_config
from .upload_proc import (
    ABORT, COMMIT, CONFIG, DATA, FRAME_BYTES, OPEN, QUIT, REPLY, read_into, recv, recv_header,
    send, entry_json,
)


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """Read objects from ``inp`` and upload each; reply on ``out``. Returns when told to
    (``QUIT``) or at the end of input."""
    kind, payload = recv(inp)
    if kind != CONFIG:
        raise SystemExit(f"upload process: expected the configuration first, got {kind!r}")
    config = json.loads(payload)
    cfg = default_transfer_config()
    cfg.multipart_chunksize = cfg.multipart_threshold = int(config["part_size"])
    cfg.max_concurrency = int(config["concurrency"])
    storages: dict[str, S3Storage] = {}
    frame = bytearray(FRAME_BYTES)  # every DATA frame is read into this one buffer
    # One reply per object, always: a failure is answered the moment it happens (the trainer
    # reads it at its next write, or as the reply to its commit or abort), and the rest of
    # that object - data, commit, abort - is then read and not answered again.
    writer, failed = None, False
    while True:
        try:
            kind, n = recv_header(inp)
            if kind == DATA and n > FRAME_BYTES:
                raise SystemExit(f"upload process: a frame of {n} bytes, at most {FRAME_BYTES}")
            if kind == DATA:
                payload = memoryview(frame)[:n]
                read_into(inp, payload)
            else:
                payload = bytearray(n)
                read_into(inp, memoryview(payload))
        except EOFError:
            kind = QUIT
        if kind == QUIT:
            if writer is not None:
                writer.abort()
            return
        if kind == OPEN:
            spec = json.loads(payload)
            bucket = spec["bucket"]
            if bucket not in storages:
                storages[bucket] = S3Storage(bucket, "", transfer_config=cfg, **config["client"])
            writer, failed = None, False
            try:
                writer = storages[bucket].open_write(spec["key"], size_hint=spec["size_hint"])
            except Exception as e:  # noqa: BLE001 - reported to the trainer
                failed = True
                _reply(out, {"error": str(e)})
        elif failed:
            if kind in (COMMIT, ABORT):
                writer, failed = None, False  # the failure was this object's reply
        elif kind == DATA:
            try:
                writer.write(payload)
            except Exception as e:  # noqa: BLE001 - reported to the trainer
                failed = True
                writer.abort()
                _reply(out, {"error": str(e)})
        elif kind == COMMIT:
            try:
                _reply(out, {"entry": entry_json(writer.commit())})
            except Exception as e:  # noqa: BLE001 - reported to the trainer
                _reply(out, {"error": str(e)})
            writer = None
        elif kind == ABORT:
            writer.abort()
            _reply(out, {})
            writer = None


def _reply(out: IO[bytes], body: dict) -> None:
    send(out, REPLY, json.dumps(body).encode())
    out.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides; QUIT or EOF ends this
    lower_thread_priority(checkpoint_nice())
    serve(sys.stdin.buffer, sys.stdout.buffer)
