"""The file source: follow the signature file a tap's :class:`~collectors.sinks.FileSink` appends to.

It follows the file by **identity** (device and inode), not by name, and keeps the file open:

* **rename rotation** (``FileSink``, logrotate ``create``): the open file is read to its end, then the files
  written since are read in order -- rotated backups newer than it (``<path>.k`` … ``<path>.1``), then the
  live file -- so nothing written before or during any number of rotations between two polls is lost;
* **truncation** (logrotate ``copytruncate``), also when the file has grown again past the old position
  before the next poll: detected by the 16 bytes before the reading position changing, and read again from
  the start (what was appended between the copy and the truncation is lost: prefer rename rotation);
* a **torn write** (a writer stopped mid-record, later records appended) is skipped and counted as corrupt
  once a complete record follows it; an incomplete record left at the end of a rotated file is counted in
  ``stats.truncated_tail_bytes``.

:meth:`FileTail.position` is the reading position at a record boundary (identity, offset, and the 16
bytes before it); the sidecar checkpoints it with the analyzer state (:mod:`monitor.sidecar.checkpoint`),
and :class:`FileTail` given one resumes there -- in the live file or in the rotated backup the file became
while the sidecar was stopped.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, BinaryIO

from collectors.record import Record
from collectors.sinks import FileReadStats, RecordStream

log = logging.getLogger("latentwatch.sidecar")
MARK = 16  # bytes before the position that identify it (a record's CRC and the end of its payload)
HEAD = 512  # a file's first bytes: its first record's prefix and header (timestamp, hashed key): with the
# inode, what identifies a file across a restart (inode numbers are reused once a file is deleted)


def _ident(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _head(path: Path, n: int = HEAD) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError:
        return b""


_TS = re.compile(rb'"ts":(-?[0-9][0-9.eE+-]*)')


def _first_ts(path: Path) -> float | None:
    """The timestamp of a file's first record (from its header), or None."""
    m = _TS.search(_head(path))
    try:
        return float(m.group(1)) if m else None
    except ValueError:
        return None


class FileTail:
    """Follow a growing signature file across rotation and truncation (see the module docstring)."""

    def __init__(self, path: Path, from_start: bool = True, position: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.stats = FileReadStats()
        self.rotations_followed = 0
        self.truncations = 0
        self.lost_files = 0  # a file read before a restart was rotated away (deleted) meanwhile
        self._stream = RecordStream(self.stats)
        self._f: BinaryIO | None = None
        self._ident: tuple[int, int] | None = None
        self._fed = 0  # bytes of the open file handed to the stream
        self._mark = b""
        self._last_ts: float | None = None  # timestamp of the newest record read (finds newer files on restore)
        self._read_all = False  # nothing read yet and nothing to skip: the first files found are all new
        if position is not None:
            self._last_ts = position.get("last_ts")
            self._restore(position)
        elif self.path.exists():
            self._open_path(0 if from_start else self.path.stat().st_size)
        else:
            self._read_all = True  # the file appears later: whatever it (and its rotations) hold is new

    # ------------------------------------------------------------------ files
    def _backups(self) -> list[Path]:
        """Rotated files, oldest (highest index) first."""
        pattern = re.compile(re.escape(self.path.name) + r"\.(\d+)$")
        found = []
        with os.scandir(self.path.parent) as entries:
            for e in entries:
                m = pattern.match(e.name)
                if m:
                    found.append((int(m.group(1)), Path(e.path)))
        return [p for _, p in sorted(found, reverse=True)]

    def _next_after(self, ident: tuple[int, int] | None, head: bytes | None, after_ts: float | None
                    ) -> BinaryIO | None:
        """Open the file written right after the file ``ident`` (with first bytes ``head``): the next newer
        backup, else the live file. If that file is not among the backups (deleted past ``backups``, or
        ``ident`` None), the oldest file whose first record is newer than ``after_ts`` (any, if None)."""
        for _ in range(20):  # the writer may rotate while we look: retry until a consistent view
            listing = []
            for p in [*self._backups(), self.path]:
                try:
                    listing.append((p, _ident(p.stat())))
                except FileNotFoundError:
                    continue
            pos = next((i for i, (p, idt) in enumerate(listing)
                        if idt == ident and (not head or _head(p, len(head)) == head)), None)
            if pos is not None:
                candidates = listing[pos + 1 :]
            elif after_ts is not None:
                candidates = [(p, idt) for p, idt in listing if (ts := _first_ts(p)) is None or ts > after_ts]
            else:
                candidates = listing
            if not candidates:
                return None
            p, idt = candidates[0]
            try:
                f = open(p, "rb")  # noqa: SIM115 - closed by _close
            except FileNotFoundError:
                continue
            if _ident(os.fstat(f.fileno())) == idt:
                return f
            f.close()  # renamed between the listing and the open: look again
        return None

    def _open_path(self, offset: int) -> None:
        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed by _close
        except FileNotFoundError:
            return
        self._set(f, offset)

    def _set(self, f: BinaryIO, offset: int) -> None:
        if f is not self._f:
            self._close()
        self._f = f
        self._ident = _ident(os.fstat(f.fileno()))
        f.seek(offset)
        self._fed = offset
        self._stream = RecordStream(self.stats)
        self._mark = os.pread(f.fileno(), MARK, offset - MARK) if offset >= MARK else b""

    def _close(self) -> None:
        if self._f is not None:
            if self._stream.pending_bytes:
                self.stats.truncated_tail_bytes += self._stream.pending_bytes
                self.stats.corrupt += 1  # a torn record: counted like any corrupt one
                log.warning("%s: a record cut off at the end of a rotated or truncated file (%d bytes skipped)",
                            self.path, self._stream.pending_bytes)
            self._f.close()
            self._f = None

    def _restore(self, position: dict[str, Any]) -> None:
        ident = (int(position["dev"]), int(position["ino"]))
        offset = int(position["offset"])
        mark = bytes.fromhex(position.get("mark", ""))
        head = bytes.fromhex(position.get("head", ""))
        for p in [self.path, *reversed(self._backups())]:  # the live file, then the newest backups first
            try:
                if _ident(p.stat()) != ident or _head(p, len(head)) != head:
                    continue
                f = open(p, "rb")  # noqa: SIM115 - closed by _close
            except FileNotFoundError:
                continue
            if _ident(os.fstat(f.fileno())) != ident:
                f.close()
                continue
            self._set(f, offset)
            if self._mark != mark:  # not the bytes we stopped after: truncated meanwhile
                self.truncations += 1
                self._set(f, 0)
            return
        log.warning("%s: the file read before the restart is gone (rotated away); reading what followed it",
                    self.path)
        self.lost_files += 1
        f = self._next_after(None, None, self._last_ts)
        if f is not None:
            self._set(f, 0)

    def _advance(self) -> bool:
        """The open file is finished (renamed away and read to its end): open the next one. True if it did."""
        ident, head = self._ident, self._head_of_open()
        f = self._next_after(ident, head, self._last_ts)  # looked up while ours is still open (its inode pinned)
        if f is None:
            return False
        self._close()
        self._set(f, 0)
        self.rotations_followed += 1
        return True

    def _head_of_open(self) -> bytes:
        return os.pread(self._f.fileno(), HEAD, 0) if self._f is not None else b""

    # ------------------------------------------------------------------ reading
    def readable(self) -> bool:
        return self.path.parent.exists()

    def position(self) -> dict[str, Any] | None:
        """Where the next record starts: a record boundary, with the bytes before it (for checkpoints)."""
        if self._f is None or self._ident is None:
            return None
        offset = self._fed - self._stream.pending_bytes
        fd = self._f.fileno()
        mark = os.pread(fd, MARK, offset - MARK) if offset >= MARK else b""
        head = os.pread(fd, min(HEAD, offset), 0)  # the file's own first bytes (only those already read)
        return {"dev": self._ident[0], "ino": self._ident[1], "offset": offset, "mark": mark.hex(),
                "head": head.hex(), "last_ts": self._last_ts, "path": str(self.path)}

    def poll(self, limit: int = 1 << 24) -> list[Record]:
        out: list[Record] = []
        for _ in range(64):  # bounded: at most this many file switches per poll
            if self._f is None:
                f = self._next_after(None, None, None if self._read_all else self._last_ts) if (
                    self._read_all or self._last_ts is not None) else None
                if f is not None:
                    self._set(f, 0)
                else:
                    self._open_path(0)
                if self._f is None:
                    return out
                self._read_all = False
            if self._truncated():
                self.truncations += 1
                log.warning("%s: truncated; reading it again from the start", self.path)
                self._set(self._f, 0)
            data = self._f.read(limit)
            if data:
                self._fed += len(data)
                out += self._stream.feed(data)
                self._mark = os.pread(self._f.fileno(), MARK, self._fed - MARK) if self._fed >= MARK else b""
                if out:
                    self._last_ts = max(r.ts for r in out)
                return out
            try:
                live = _ident(self.path.stat())
            except FileNotFoundError:
                live = None
            if live == self._ident or live is None:
                return out  # nothing new (or between a rename and the new file: next poll)
            # ours was renamed away and is read to its end: the file written after it, in order
            if not self._advance():
                return out
        return out

    def _truncated(self) -> bool:
        """Our file (still the live one) was truncated, possibly regrown: the bytes before our position changed."""
        if self._f is None:
            return False
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return False
        if _ident(st) != self._ident:
            return False  # a rename, handled in poll
        if st.st_size < self._fed:
            return True
        if self._fed >= MARK and self._mark:
            return os.pread(self._f.fileno(), MARK, self._fed - MARK) != self._mark
        return False

    def __enter__(self) -> FileTail:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._close()
