"""Where records go after the tap: an in-process queue or an append-only file.

A sink is anything with ``write(record)``, ``flush()`` and ``close()`` (:class:`Sink`). The tap calls
``write`` from its background worker, never from the forward pass; a sink may still be slow or fail,
and the tap counts its exceptions. Network sinks (Kafka) implement the same three methods.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from collectors.record import MAGIC, PREFIX, VERSION, Record, RecordError, decode, encode, frame_length

log = logging.getLogger(__name__)


@runtime_checkable
class Sink(Protocol):
    """What the tap hands records to."""

    def write(self, record: Record) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


class QueueSink:
    """Bounded in-process hand-off to a monitor in the same process.

    ``write`` never blocks: when ``maxsize`` records are waiting, the record is dropped and counted
    in ``dropped``.
    """

    def __init__(self, maxsize: int = 10_000) -> None:
        self._q: queue.Queue[Record] = queue.Queue(maxsize=maxsize)
        self.dropped = 0
        self.written = 0

    def write(self, record: Record) -> None:
        try:
            self._q.put_nowait(record)
            self.written += 1
        except queue.Full:
            self.dropped += 1

    def get(self, timeout: float | None = None) -> Record | None:
        """Next record, or None after ``timeout`` seconds without one."""
        try:
            return self._q.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self) -> list[Record]:
        """All records waiting now."""
        out = []
        while True:
            try:
                out.append(self._q.get_nowait())
            except queue.Empty:
                return out

    def __len__(self) -> int:
        return self._q.qsize()

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


DEFAULT_MAX_BYTES = 256 << 20  # with DEFAULT_BACKUPS: at most 1 GiB on disk, half the shipped 2 GiB emptyDir
DEFAULT_BACKUPS = 3


class FileSink:
    """Append encoded records to a file (the format of :mod:`collectors.record`, back to back).

    Used by the tap beside a sidecar, for replay and for building baselines. ``half=True`` stores arrays as
    float16 (half the size). Each ``flush`` hands the bytes to the OS; ``fsync=True`` also forces them to disk.

    **Rotation** by size and count: before a record would take the file past ``max_bytes``, the file is
    renamed ``<path>.1`` (``.1`` → ``.2`` …, the oldest beyond ``backups`` deleted) and a new one started, at
    a record boundary. Disk use is at most ``(backups + 1) * max_bytes`` plus one record (docs/sidecar.md:
    sizing). The sidecar's file source follows the renames by file identity. ``max_bytes=None`` never rotates
    (a recording for a baseline or a replay).
    """

    def __init__(self, path: str | os.PathLike[str], *, half: bool = False, fsync: bool = False,
                 max_bytes: int | None = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS) -> None:
        if max_bytes is not None and max_bytes < 1024:
            raise ValueError(f"max_bytes must be at least 1024, got {max_bytes}")
        if backups < 0:
            raise ValueError(f"backups must be >= 0, got {backups}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._size = self._f.tell()
        self._lock = threading.Lock()
        self.half = half
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.backups = backups
        self.written = 0
        self.rotations = 0

    def backup_path(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def write(self, record: Record) -> None:
        data = encode(record, half=self.half)
        with self._lock:
            if self.max_bytes is not None and self._size and self._size + len(data) > self.max_bytes:
                self._rotate()
            self._f.write(data)
            self._size += len(data)
            self.written += 1

    def _rotate(self) -> None:
        self._f.flush()
        if self.fsync:
            os.fsync(self._f.fileno())
        self._f.close()
        if self.backups == 0:
            self.path.unlink(missing_ok=True)
        else:
            self.backup_path(self.backups).unlink(missing_ok=True)
            for i in range(self.backups - 1, 0, -1):
                if self.backup_path(i).exists():
                    os.replace(self.backup_path(i), self.backup_path(i + 1))
            os.replace(self.path, self.backup_path(1))
        self._f = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._size = 0
        self.rotations += 1

    def flush(self) -> None:
        with self._lock:
            if not self._f.closed:
                self._f.flush()
                if self.fsync:
                    os.fsync(self._f.fileno())

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._f.close()

    def __enter__(self) -> FileSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class FileReadStats:
    """What a reader skipped: corrupt records and a truncated tail."""

    def __init__(self) -> None:
        self.records = 0
        self.corrupt = 0
        self.truncated_tail_bytes = 0
        self.errors: list[str] = []


class RecordStream:
    """Incremental decoder for records back to back (a file being appended to, an HTTP body).

    ``feed(data)`` returns the complete records decoded so far; a partial record at the end waits for
    more bytes. A corrupt record is counted in ``stats.corrupt`` and skipped: decoding resumes at the
    next record boundary it can find, so one bad record never loses the ones after it.
    """

    _SYNC = MAGIC + bytes([VERSION, 0, 0, 0])

    def __init__(self, stats: FileReadStats | None = None) -> None:
        self.stats = stats if stats is not None else FileReadStats()
        self._buf = b""
        self._offset = 0  # bytes consumed before the buffer (for error messages)

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def _torn(self, buf: bytes, pos: int) -> bool:
        """An incomplete record that a complete, valid record follows was torn (its writer stopped mid-write
        and later records were appended): skip it now instead of waiting for bytes that will never come."""
        nxt = buf.find(self._SYNC, pos + 1)
        while nxt >= 0:
            try:
                total = frame_length(buf[nxt : nxt + PREFIX.size])
                if len(buf) - nxt < total:
                    return False
                decode(buf[nxt : nxt + total])
                return True
            except RecordError:
                nxt = buf.find(self._SYNC, nxt + 1)
        return False

    def feed(self, data: bytes) -> list[Record]:
        buf = self._buf + data
        out: list[Record] = []
        pos = 0
        while len(buf) - pos >= PREFIX.size:
            try:
                total = frame_length(buf[pos : pos + PREFIX.size])
                if len(buf) - pos < total:
                    if self._torn(buf, pos):
                        raise RecordError("torn record: a complete record starts inside it")
                    break  # wait for the rest of this record
                rec = decode(buf[pos : pos + total])
            except RecordError as exc:
                self.stats.corrupt += 1
                if len(self.stats.errors) < 20:
                    self.stats.errors.append(f"offset {self._offset + pos}: {exc}")
                nxt = buf.find(self._SYNC, pos + 1)
                pos = nxt if nxt >= 0 else max(pos + 1, len(buf) - len(self._SYNC) + 1)
                continue
            out.append(rec)
            self.stats.records += 1
            pos += total
        self._offset += pos
        self._buf = buf[pos:]
        return out


def read_file(path: str | os.PathLike[str], stats: FileReadStats | None = None) -> Iterator[Record]:
    """Yield the records of a file written by :class:`FileSink`.

    A corrupt record is counted in ``stats.corrupt`` and skipped (reading resumes at the next record
    boundary it can find); a truncated last record (a writer cut off mid-write) is counted in
    ``stats.truncated_tail_bytes``. Nothing else is lost.
    """
    stream = RecordStream(stats)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            yield from stream.feed(chunk)
    if stream.pending_bytes:
        stream.stats.truncated_tail_bytes = stream.pending_bytes
        log.warning("%s: last record truncated (%d bytes ignored)", path, stream.pending_bytes)
