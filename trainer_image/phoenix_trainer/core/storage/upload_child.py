"""The upload process's side of ``upload_proc``: read objects from stdin, upload each with
the same ``s3._S3StreamWriter`` an in-process upload uses, answer on stdout.

Started by ``upload_proc.UploadProcess`` as ``python -m`` this module; its first message is
the client's settings (credentials included: they travel over the pipe only). It exits at
the end of its input, aborting an upload left open. Never imports torch.
"""
from __future__ import annotations

import json
import signal
import sys
from typing import IO

from .s3 import S3Storage, default_transfer_config
from .upload_proc import (
    ABORT, COMMIT, CONFIG, DATA, FRAME_BYTES, OPEN, REPLY, read_into, recv, recv_header, send,
    entry_json,
)


def serve(inp: IO[bytes], out: IO[bytes]) -> None:
    """Read objects from ``inp`` and upload each; reply on ``out``. Returns at end of input."""
    kind, payload = recv(inp)
    if kind != CONFIG:
        raise SystemExit(f"upload process: expected the configuration first, got {kind!r}")
    config = json.loads(payload)
    cfg = default_transfer_config()
    cfg.multipart_chunksize = cfg.multipart_threshold = int(config["part_size"])
    cfg.max_concurrency = int(config["concurrency"])
    storages: dict[str, S3Storage] = {}
    frame = bytearray(FRAME_BYTES)  # every DATA frame is read into this one buffer
    writer, failed = None, None
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
            if writer is not None:
                writer.abort()
            return
        if kind == OPEN:
            spec = json.loads(payload)
            bucket = spec["bucket"]
            if bucket not in storages:
                storages[bucket] = S3Storage(bucket, "", transfer_config=cfg, **config["client"])
            failed = None
            try:
                writer = storages[bucket].open_write(spec["key"], size_hint=spec["size_hint"])
            except Exception as e:  # noqa: BLE001 - reported to the trainer
                writer, failed = None, e
        elif kind == DATA:
            if writer is None or failed is not None:
                continue  # the trainer hears of the failure at its next write or commit
            try:
                writer.write(payload)
            except Exception as e:  # noqa: BLE001 - reported to the trainer
                failed = e
                writer.abort()
                _reply(out, {"error": str(e)})
        elif kind == COMMIT:
            if failed is not None:
                if writer is None:
                    _reply(out, {"error": str(failed)})
                writer, failed = None, None  # an early failure was already reported
                continue
            try:
                _reply(out, {"entry": entry_json(writer.commit())})
            except Exception as e:  # noqa: BLE001 - reported to the trainer
                _reply(out, {"error": str(e)})
            writer = None
        elif kind == ABORT:
            if writer is not None and failed is None:
                writer.abort()
            if failed is None or writer is None:
                _reply(out, {})
            writer, failed = None, None


def _reply(out: IO[bytes], body: dict) -> None:
    send(out, REPLY, json.dumps(body).encode())
    out.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the trainer decides; EOF ends this
    serve(sys.stdin.buffer, sys.stdout.buffer)
