"""Shared-memory payloads for an adapter sync between processes of one host.

Over gloo a bucket's bytes cross the loopback TCP stack and are copied into the receiver's buffer;
between two processes of one host they need not move at all. With a :class:`SharedPayloadWriter`
the sender packs each bucket straight into a segment file under ``/dev/shm`` and sends only its
header, manifest and the segment's name over the group; the receiver's
:class:`SharedPayloadReader` maps the segment and files every tensor as a view of the mapping (no
copy). The segment stays the receiver's until the last tensor viewing it is gone (the reader
notices through the buffer object torch keeps for the mapping); the reader reports such segments
with its acknowledgement, and the writer reuses them for later buckets, whose pages are then already
mapped (writing fresh pages costs more than the copy itself). A segment is never written while
the receiver holds tensors of it. Segments are removed when the writer closes or its process exits.

Nothing here imports a framework beyond torch; the transport (``sync.transport``) moves the
descriptors.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import mmap
import os
import threading
import uuid
import weakref
from dataclasses import dataclass
from typing import Any

from moe_lora_plugins.sync.errors import AdapterSyncError

SHM_DIR = "/dev/shm"
_ALIGN = 2 << 20


@dataclass(frozen=True)
class SegmentRef:
    """Where one bucket's payload lies: segment ``path`` (number ``segment`` of its writer), ``nbytes`` used."""

    path: str
    segment: int
    size: int
    nbytes: int

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "segment": self.segment, "size": self.size, "nbytes": self.nbytes}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> SegmentRef:
        return cls(str(value["path"]), int(value["segment"]), int(value["size"]), int(value["nbytes"]))


class _Segment:
    def __init__(self, path: str, size: int, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, size)
            self.map = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        self.path = path
        self.size = size

    def bytes_view(self, nbytes: int) -> Any:
        """A uint8 tensor over the first ``nbytes`` of the segment, kept alive by a buffer object of its own."""
        import torch

        holder = (ctypes.c_uint8 * nbytes).from_buffer(self.map)
        return holder, torch.frombuffer(holder, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)


class SharedPayloadWriter:
    """The sender's segments: :meth:`acquire` one for a bucket, fill it, send :attr:`SegmentRef`.

    A segment is busy from :meth:`acquire` until the receiver reports it released
    (:meth:`released`); only free segments are handed out again.
    """

    def __init__(self, directory: str = SHM_DIR) -> None:
        if not os.path.isdir(directory):
            raise AdapterSyncError(
                f"shared-memory sync needs {directory} (Linux tmpfs); use the group transport (gloo/NCCL) here"
            )
        self._directory = directory
        self._prefix = f"moelora-sync-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self._segments: dict[int, _Segment] = {}
        self._free: set[int] = set()
        self._lock = threading.Lock()
        atexit.register(self.close)

    def acquire(self, nbytes: int) -> tuple[SegmentRef, Any]:
        """A free segment of at least ``nbytes`` and a uint8 CPU tensor over its first ``nbytes`` to fill."""
        with self._lock:
            fitting = [i for i in self._free if self._segments[i].size >= nbytes]
            if fitting:
                number = min(fitting, key=lambda i: self._segments[i].size)
                self._free.discard(number)
            else:
                number = len(self._segments)
                size = max(_ALIGN, -(-nbytes // _ALIGN) * _ALIGN)
                path = os.path.join(self._directory, f"{self._prefix}-{number}")
                self._segments[number] = _Segment(path, size, create=True)
            segment = self._segments[number]
        _, tensor = segment.bytes_view(nbytes)
        return SegmentRef(segment.path, number, segment.size, nbytes), tensor

    def released(self, numbers: list[int]) -> None:
        """The receiver holds no tensor of these segments any more: they may be written again."""
        with self._lock:
            for number in numbers:
                if number not in self._segments:
                    raise AdapterSyncError(f"the receiver released segment {number}, which this writer never made")
                self._free.add(number)

    @property
    def key(self) -> str:
        """What the receiver reports released segments under (the segment paths without their number)."""
        return os.path.join(self._directory, self._prefix)

    @property
    def segments(self) -> int:
        return len(self._segments)

    def close(self) -> None:
        """Remove every segment file (a receiver's existing mappings stay valid until it drops them)."""
        with self._lock:
            for segment in self._segments.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(segment.path)
            self._segments.clear()
            self._free.clear()


class SharedPayloadReader:
    """The receiver's mappings of senders' segments (each mapped once, reused for later buckets)."""

    def __init__(self) -> None:
        self._maps: dict[str, _Segment] = {}
        self._in_use: dict[str, int] = {}
        self._released: dict[str, list[int]] = {}
        self._lock = threading.Lock()

    def open(self, ref: SegmentRef, writer_key: str) -> Any:
        """A uint8 CPU tensor over ``ref``'s bytes (a view of the mapping: no copy). ``writer_key`` names
        the sender, so released segments go back to the right writer."""
        with self._lock:
            if self._in_use.get(ref.path):
                raise AdapterSyncError(
                    f"segment {ref.path} arrived again while this receiver still holds tensors of it; the sender "
                    "wrote into a segment it had not been given back"
                )
            segment = self._maps.get(ref.path)
            if segment is None or segment.size != ref.size:
                try:
                    segment = _Segment(ref.path, ref.size, create=False)
                except FileNotFoundError:
                    raise AdapterSyncError(
                        f"shared-memory segment {ref.path} does not exist here: the sender runs on another host "
                        "(or its process ended). Use the group transport between hosts."
                    ) from None
                self._maps[ref.path] = segment
            if ref.nbytes > segment.size:
                raise AdapterSyncError(f"segment {ref.path} is {segment.size} bytes, the bucket claims {ref.nbytes}")
            self._in_use[ref.path] = 1
        holder, tensor = segment.bytes_view(ref.nbytes)
        weakref.finalize(holder, self._release, ref.path, ref.segment, writer_key)
        return tensor

    def _release(self, path: str, number: int, writer_key: str) -> None:
        with self._lock:
            self._in_use.pop(path, None)
            self._released.setdefault(writer_key, []).append(number)

    def take_released(self, writer_key: str) -> list[int]:
        """Segments of this writer whose tensors are all gone since the last call."""
        with self._lock:
            return self._released.pop(writer_key, [])


_default_writer: SharedPayloadWriter | None = None
_default_reader: SharedPayloadReader | None = None


def default_writer() -> SharedPayloadWriter:
    """This process's writer (made on first use)."""
    global _default_writer
    if _default_writer is None:
        _default_writer = SharedPayloadWriter()
    return _default_writer


def default_reader() -> SharedPayloadReader:
    """This process's reader (made on first use)."""
    global _default_reader
    if _default_reader is None:
        _default_reader = SharedPayloadReader()
    return _default_reader
