"""Part buffers for streamed uploads: reused from one upload to the next, filled without
holding the GIL.

A streamed checkpoint copies every byte once, from the serializer's buffer into the part
that S3 receives (``s3._S3StreamWriter``). Done with ``bytearray +=`` in a fresh buffer per
part, that copy held the GIL throughout and page-faulted every new part in: on a 2-core
machine it was most of the GIL time an asynchronous checkpoint took from the training loop
(py-spy ``--gil``: 46 of 72 ms per 76 MB checkpoint), and the training thread waits for the
GIL after each torch call. Here the copy of a large write is a ``memmove`` through ctypes,
which drops the GIL for the length of the copy, into a buffer an earlier part already
faulted in.

``PartBuffers`` keeps at most ``keep`` idle buffers, of one part size: an upload has at
most ``in_flight`` parts out plus the one being filled, so the pool holds, between uploads,
what the process needed during the last one, no more (9 x 16 MiB with the defaults). Stdlib only (this package never imports
torch).
"""
from __future__ import annotations

import ctypes
import threading

# Copies smaller than this are a plain slice assignment: the GIL round trip of a ctypes
# call costs more than copying them.
GIL_FREE_COPY_MIN = 256 << 10


class _PyBuffer(ctypes.Structure):
    """CPython's ``Py_buffer`` (stable ABI since 3.11), to find where a read-only buffer's
    bytes are: ctypes' ``from_buffer`` takes writable ones only."""

    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


_get_buffer = ctypes.pythonapi.PyObject_GetBuffer
_get_buffer.argtypes = [ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int]
_get_buffer.restype = ctypes.c_int
_release_buffer = ctypes.pythonapi.PyBuffer_Release
_release_buffer.argtypes = [ctypes.POINTER(_PyBuffer)]
_release_buffer.restype = None
_PYBUF_SIMPLE = 0  # contiguous bytes, read-only allowed


class PartBuffer:
    """One part's worth of memory: a ``bytearray`` of a fixed size (S3 takes a bytearray body,
    not a memoryview) and the address to copy into it. Its size never changes (ctypes holds
    an export of it)."""

    __slots__ = ("data", "_view", "address")

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self._view = (ctypes.c_char * size).from_buffer(self.data)
        self.address = ctypes.addressof(self._view)

    def fill(self, at: int, src: memoryview) -> None:
        """Copy ``src`` (contiguous bytes) into the buffer at ``at``; large copies run
        without the GIL."""
        n = len(src)
        if at < 0 or at + n > len(self.data):
            raise ValueError(f"{n} bytes at {at} do not fit a part of {len(self.data)}")
        if n < GIL_FREE_COPY_MIN:
            self.data[at:at + n] = src
            return
        view = _PyBuffer()
        if _get_buffer(src, ctypes.byref(view), _PYBUF_SIMPLE) != 0:
            raise ValueError("the bytes to copy are not one contiguous buffer")
        try:
            ctypes.memmove(self.address + at, view.buf, n)  # ctypes releases the GIL here
        finally:
            _release_buffer(ctypes.byref(view))

    def prefix(self, n: int) -> bytearray:
        """The first ``n`` bytes as their own bytearray (a last part shorter than the rest)."""
        out = PartBuffer(n)
        out.fill(0, memoryview(self.data)[:n])
        return out.data


class PartBuffers:
    """Idle part buffers, shared by every upload of one storage client."""

    def __init__(self, keep: int) -> None:
        self.keep = max(0, keep)
        self._idle: dict[int, list[PartBuffer]] = {}
        self._lock = threading.Lock()

    def take(self, size: int) -> PartBuffer:
        with self._lock:
            idle = self._idle.get(size)
            if idle:
                return idle.pop()
        return PartBuffer(size)

    def give(self, buf: PartBuffer) -> None:
        """Back for the next part, unless ``keep`` of its size are already idle. Only the
        latest size is kept (a huge shard's larger parts do not stay beside the usual ones)."""
        size = len(buf.data)
        with self._lock:
            if size not in self._idle:
                self._idle = {size: []}
            idle = self._idle[size]
            if len(idle) < self.keep:
                idle.append(buf)

    def idle_bytes(self) -> int:
        with self._lock:
            return sum(size * len(bufs) for size, bufs in self._idle.items())

