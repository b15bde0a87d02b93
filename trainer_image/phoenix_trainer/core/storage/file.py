"""``file:///abs/path``: checkpoint storage in a local directory tree (``LocalStorage``).

Writes are temp file + rename, so an object is visible only when complete (what the
manifest-last rule needs). No torch import.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from ..errors import StorageError
from .entry import Digest, FileEntry


class LocalStorage:
    """``file:///abs/path``: a directory tree. Writes are temp-file + rename, so atomic."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).absolute()
        self.uri = "file://" + str(self.root)

    def _path(self, key: str) -> Path:
        p = (self.root / key.strip("/")) if key.strip("/") else self.root
        return p

    def uri_for(self, key: str) -> str:
        return "file://" + str(self._path(key))

    def child(self, sub: str) -> "LocalStorage":
        return LocalStorage(self._path(sub))

    def _atomic_write(self, key: str, writer) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                writer(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(key, lambda f: f.write(data))

    def put_file(self, key: str, path: str | os.PathLike) -> None:
        def copy(f):
            with open(path, "rb") as src:
                shutil.copyfileobj(src, f, 8 << 20)
        self._atomic_write(key, copy)

    def open_write(self, key: str, size_hint: int | None = None) -> "_LocalWriter":
        return _LocalWriter(self._path(key))

    def prepare_uploads(self) -> None:
        pass  # writes are this process's own file writes: nothing to start

    def get_bytes(self, key: str) -> bytes:
        p = self._path(key)
        if not p.is_file():
            raise FileNotFoundError(self.uri_for(key))
        return p.read_bytes()

    def get_bytes_sha256(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def read_into(self, key: str, offset: int, view: Any) -> int:
        """``len(view)`` bytes at ``offset`` into ``view`` (fewer if the file is shorter);
        the file's size. ``os.preadv`` releases the GIL, so ranges read in parallel."""
        p = self._path(key)
        mv = memoryview(view).cast("B")
        try:
            fd = os.open(p, os.O_RDONLY)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise FileNotFoundError(self.uri_for(key)) from None
        try:
            total = os.fstat(fd).st_size
            got = 0
            while got < len(mv) and (k := os.preadv(fd, [mv[got:]], offset + got)):
                got += k
            return total
        finally:
            os.close(fd)

    def get_file(self, key: str, path: str | os.PathLike) -> None:
        p = self._path(key)
        if not p.is_file():
            raise FileNotFoundError(self.uri_for(key))
        shutil.copyfile(p, path)

    @contextlib.contextmanager
    def open_read(self, key: str) -> Iterator[IO[bytes]]:
        p = self._path(key)
        if not p.is_file():
            raise FileNotFoundError(self.uri_for(key))
        with open(p, "rb") as f:
            yield f

    def size(self, key: str) -> int | None:
        try:
            st = self._path(key).stat()
        except FileNotFoundError:
            return None
        return st.st_size if not Path(self._path(key)).is_dir() else None

    def stat(self, key: str) -> tuple[int | None, str | None]:
        return self.size(key), None  # a file system keeps no checksum

    def list_dirs(self, prefix: str) -> list[str]:
        p = self._path(prefix)
        if not p.is_dir():
            return []
        return sorted(c.name for c in p.iterdir() if c.is_dir())

    def list_keys(self, prefix: str) -> list[str]:
        p = self._path(prefix)
        if not p.is_dir():
            return []
        return sorted(str(f.relative_to(self.root)) for f in p.rglob("*")
                      if f.is_file() and not f.name.endswith(".tmp"))

    def delete_prefix(self, prefix: str) -> None:
        p = self._path(prefix)
        if p == self.root:
            raise StorageError(f"refusing to delete the whole storage root {self.uri}")
        shutil.rmtree(p, ignore_errors=True)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(key).unlink()

    def __repr__(self) -> str:
        return f"LocalStorage({self.uri!r})"


class _LocalWriter:
    """Straight into a temp file next to the destination, renamed on commit (atomic)."""

    def __init__(self, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
        self.f = os.fdopen(fd, "wb")
        self.dest, self.digest = dest, Digest()

    def write(self, data: Any) -> int:
        mv = memoryview(data).cast("B")
        self.digest.update(mv)
        self.f.write(mv)
        return len(mv)

    def flush(self) -> None:
        pass  # commit makes it durable

    def commit(self) -> FileEntry:
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
            os.replace(self.tmp, self.dest)
        except BaseException:
            self.abort()
            raise
        return FileEntry(size=self.digest.n, sha256=self.digest.h.hexdigest())

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.f.close()
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)
