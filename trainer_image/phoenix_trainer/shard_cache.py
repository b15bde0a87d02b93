"""A rank's own sharded-checkpoint objects, kept beside it in its pod, for in-place rejoins.

In an in-place gang (``gangRestart: Member``) whose state is sharded (FSDP2: no replica to
copy from), every rank rolls back to the newest checkpoint after a member is lost (the
commit keeps copies only of state with a DTensor in it: replicated state comes back from the
peers' snapshots). The
survivors wrote most of that checkpoint themselves, and their pods are still there. So each
rank keeps a copy of the DCP objects it uploads (``dcp-__<rank>_0.distcp``) in the pod's
memory-backed peer directory (``PHOENIX_PEER_DIR``, which outlives a re-exec and a warm
hand-over). A restore then reads a survivor's ranges from its copy, and only the lost
member's newcomer reads its shards from storage.

- **Written** while the object streams to storage: the same bytes are written to a partial
  file (``tee``). They are kept under the object's size and sha256 (``keep``) only once the
  upload has verified them (``writer.upload_shards``). A retried upload starts a new partial
  file; a failed one leaves nothing.
- **Found** by content (``find``): the manifest entry's size and sha256 name the copy, so a
  copy of another attempt's object at the same step is never taken for this one.
- **Checked** as every read is: each block against its CRC-32 in ``dcp-.blocks.json``
  (dcp_storage). A block of the copy that fails its check is read from storage instead. The
  copy saves reads; it never decides what is restored.
- **Bounded**: the ``KEEP`` (2) newest objects per local rank. The newest one may belong to
  a checkpoint that never committed (a member lost mid-save); the one before it did.

The cost is host memory: up to twice the rank's share of the sharded state, in a tmpfs
counted against the pod's memory. ``PHOENIX_LOCAL_SHARDS=0`` turns it off. Never writes to
checkpoint storage; never logs credentials.
"""
from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from .core.contract import ENV_PEER_DIR

log = logging.getLogger("phoenix.checkpoint")

ENV_LOCAL_SHARDS = "PHOENIX_LOCAL_SHARDS"  # "0": no local copies
SUBDIR = "dcp-own"
KEEP = 2
_counter = itertools.count()


def _name(sha256: str, size: int) -> str:
    return f"{sha256}-{size}"


class Tee:
    """What a streamed object is written to: ``sink`` (storage), and a partial local copy
    while that works (a local failure drops the copy, never the upload)."""

    def __init__(self, sink: Any, path: Path) -> None:
        self.sink, self.path = sink, path
        self._file: Any = None
        try:
            self._file = open(path, "wb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            log.warning("no local copy of this rank's shard (%s): a rejoin reads it from storage", e)

    def write(self, data: Any) -> int:
        n = self.sink.write(data)
        if self._file is not None:
            try:
                self._file.write(data)
            except OSError as e:  # the tmpfs is full: the copy goes, the upload goes on
                log.warning("dropping the local copy of this rank's shard (%s)", e)
                self.drop()
        return n

    def flush(self) -> None:
        self.sink.flush()

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                self.drop()

    @property
    def complete(self) -> bool:
        return self._file is not None

    def drop(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass
        self.path.unlink(missing_ok=True)


class ShardCache:
    """This pod's copies (see the module docstring); ``local_rank`` names the folder this
    process keeps its own in (the pod's other ranks keep theirs beside it)."""

    def __init__(self, directory: str | os.PathLike, local_rank: int = 0, keep: int = KEEP) -> None:
        self.root = Path(directory) / SUBDIR
        self.mine = self.root / f"local-{local_rank}"
        self.mine.mkdir(parents=True, exist_ok=True)
        self.keep_n = keep

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "ShardCache | None":
        """The pod's cache where a peer directory is mounted (in-place gangs) and not turned
        off; None otherwise."""
        environ = os.environ if environ is None else environ
        peer_dir = environ.get(ENV_PEER_DIR)
        if not peer_dir or environ.get(ENV_LOCAL_SHARDS, "1").strip().lower() in ("0", "false", "off", "no"):
            return None
        try:
            return cls(peer_dir, int(environ.get("LOCAL_RANK", "0") or 0))
        except (OSError, ValueError) as e:
            log.warning("no local shard copies in %s (%s)", peer_dir, e)
            return None

    def tee(self, sink: Any) -> Tee:
        """A new partial copy of what is written to ``sink`` (one per upload try)."""
        return Tee(sink, self.mine / f".partial-{os.getpid()}-{next(_counter)}")

    def keep(self, tee: Tee, sha256: str, size: int) -> Path | None:
        """Keep ``tee``'s copy as the object ``sha256``/``size`` once storage has verified the
        upload; the copy if kept. Older copies beyond ``KEEP`` go."""
        tee.close()
        if not tee.complete or tee.path.stat().st_size != size:
            tee.drop()
            return None
        final = self.mine / _name(sha256, size)
        os.replace(tee.path, final)
        kept = sorted((p for p in self.mine.iterdir() if not p.name.startswith(".")),
                      key=lambda p: p.stat().st_mtime_ns, reverse=True)
        for old in kept[self.keep_n:]:
            old.unlink(missing_ok=True)
        return final

    def find(self, sha256: str, size: int) -> Path | None:
        """A copy of the object with this content, kept by any rank of this pod."""
        for folder in [self.mine, *sorted(p for p in self.root.iterdir() if p != self.mine)]:
            path = folder / _name(sha256, size)
            try:
                if path.stat().st_size == size:
                    return path
            except OSError:
                continue
        return None
