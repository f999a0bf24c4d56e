"""A tamper-evident audit trail: append-only JSON-lines segments, each entry chained to the one before.

Every entry is one JSON object on one line with ``seq`` (0, 1, 2, ... without gaps), ``ts``, ``kind``, its
fields, ``prev`` (the previous entry's ``hash``; 64 zeros for the first entry ever) and, last, ``hash``:
the SHA-256 of the line's exact bytes up to it, closed with ``}`` (the line without its final
``,"hash":"…"}`` plus ``}``), so anyone can check it without re-serializing JSON. Changing, inserting,
removing or reordering an entry breaks the chain from there on.

Kinds: ``start`` (a writer opened: model, fingerprint, baseline and probe hashes, version), ``segment``
(first entry of every segment file), ``record`` (one sampled request), ``alarm`` (a detector fired),
``checkpoint`` (``head_seq`` and ``head``, the hash of the entry before it, authenticated with the
operator's key: ``mac`` = HMAC-SHA256 over ``latentwatch-audit-checkpoint\\n{head_seq}\\n{head}``),
``recovered`` (a writer found a torn last entry left by a crash and continued in a new segment) and
``pruned`` (retention removed the oldest segments; names the last removed entry's seq and hash, so what
remains still verifies).

Segments are ``segment-{first seq:012d}.jsonl`` in one folder; a new one starts above ``segment_bytes``
or after ``segment_seconds``. ``HEAD`` holds the newest checkpoint (written atomically): a tail cut below
it is detected. A tail cut together with ``HEAD`` is detected only against a witness outside the folder:
the sidecar exports ``latentwatch_audit_checkpoint_seq``, which Prometheus keeps (``audit verify
--expect-seq``).

Durability (the fsync policy): entries are handed to the OS after every analyzed batch (a crash of the
process loses at most the batch being written, whose records the file and Kafka sources read again after
the restart, so they are audited again), and the file is fsynced at every checkpoint (every
``checkpoint_seconds``), at rotation and at close: a crash of the machine loses at most the entries after
the last checkpoint. A torn last entry is never accepted: the next writer leaves it in place, starts a new
segment and records a ``recovered`` entry naming it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from pathlib import Path
from typing import Any

import orjson

GENESIS = "0" * 64
MAC_CONTEXT = "latentwatch-audit-checkpoint"
SEGMENT_GLOB = "segment-*.jsonl"


class AuditError(RuntimeError):
    """The audit folder cannot be written or read (one line, for users)."""


HASH_SUFFIX = len(',"hash":"') + 64 + len('"}')  # the bytes a line ends with (before its newline)


def seal(entry: dict[str, Any]) -> tuple[bytes, str]:
    """(the line to write, its hash) for an entry without ``hash``."""
    body = orjson.dumps(entry)
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + b',"hash":"' + digest.encode() + b'"}\n', digest


def line_hash(line: bytes) -> str | None:
    """The hash a written line (without its newline) must carry, or None when it does not end in one."""
    if len(line) <= HASH_SUFFIX or not line.endswith(b'"}') or line[-HASH_SUFFIX:-HASH_SUFFIX + 9] != b',"hash":"':
        return None
    return hashlib.sha256(line[:-HASH_SUFFIX] + b"}").hexdigest()


def checkpoint_mac(key: bytes, head_seq: int, head: str) -> str:
    return hmac.new(key, f"{MAC_CONTEXT}\n{head_seq}\n{head}".encode(), hashlib.sha256).hexdigest()


def segment_name(first_seq: int) -> str:
    return f"segment-{first_seq:012d}.jsonl"


def segments(folder: Path) -> list[Path]:
    return sorted(Path(folder).glob(SEGMENT_GLOB))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def last_complete(path: Path) -> tuple[dict[str, Any] | None, int, int]:
    """(last complete entry, byte offset where a torn tail begins or -1, its length) of a segment; reads
    from the end, only as much as the last line needs."""
    size = path.stat().st_size
    block = 1 << 16
    with open(path, "rb") as f:
        while True:
            start = max(0, size - block)
            f.seek(start)
            data = f.read()
            end = data.rfind(b"\n") + 1  # everything before is whole lines
            before = data.rfind(b"\n", 0, end - 1) if end else -1  # the newline before the last whole line
            if start == 0 or before >= 0:
                break
            block *= 4
    torn = (start + end, len(data) - end) if end < len(data) else (-1, 0)
    last = None
    if end:
        try:
            last = json.loads(data[before + 1 : end])
        except ValueError:
            last = None
    return last, torn[0], torn[1]


class AuditTrail:
    """Append entries to the chain in ``folder`` (see the module docstring).

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> trail = AuditTrail(folder, key=b"k" * 32, start={"model": "m"})
    >>> trail.append("record", key="ab12", scores={"insult": 0.1})["seq"]
    3
    >>> trail.close()
    >>> from monitor.audit.verify import verify
    >>> verify(folder, key=b"k" * 32).ok
    True
    """

    def __init__(self, folder: Path, key: bytes, start: dict[str, Any] | None = None, *,
                 segment_bytes: int = 64 << 20, segment_seconds: float = 86400.0,
                 retention_seconds: float = 183 * 86400.0, checkpoint_seconds: float = 1.0) -> None:
        if len(key) < 16:
            raise AuditError("the audit key must be at least 16 bytes")
        self.folder = Path(folder)
        self.key = key
        self.segment_bytes = segment_bytes
        self.segment_seconds = segment_seconds
        self.retention_seconds = retention_seconds
        self.checkpoint_seconds = checkpoint_seconds
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AuditError(f"cannot create the audit folder {self.folder}: {exc.strerror}") from exc
        self.seq, self.head = 0, GENESIS
        self.checkpoint_seq = -1  # seq of the newest checkpoint entry
        self.entries_total = 0
        self._f: Any = None
        self._opened_at = 0.0
        self._last_checkpoint = time.monotonic()
        self._lock = self._take_lock()
        torn: tuple[str, int, int] | None = None
        existing = segments(self.folder)
        while existing:
            path = existing.pop()
            last, offset, length = last_complete(path)
            if last is None and length == 0:  # created, crashed before its first entry: holds nothing
                path.unlink()
                continue
            if last is None and offset == 0:  # only a torn first entry: set aside (its name is the next one's)
                moved = path.with_name(path.name + ".torn")
                os.replace(path, moved)
                torn = (moved.name, 0, length)
                continue
            if last is None or "hash" not in last:
                raise AuditError(f"{path}: the last entry is unreadable; run latentwatch audit verify")
            self.seq, self.head = int(last["seq"]) + 1, str(last["hash"])
            if offset >= 0:
                torn = (path.name, offset, length)
            break
        self._open_segment()
        if torn is not None:
            self.append("recovered", torn_segment=torn[0], torn_offset=torn[1], torn_bytes=torn[2])
        self.append("start", **(start or {}))
        self.checkpoint()

    def _take_lock(self) -> int:
        """One writer per folder: an exclusive lock held while the trail is open."""
        import fcntl

        fd = os.open(self.folder / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise AuditError(f"another writer holds {self.folder}: give each sidecar its own audit folder") from exc
        return fd

    # ----------------------------------------------------------------- writing
    def _open_segment(self) -> None:
        """Start the next segment; the current one is closed only once the new one is open."""
        previous = segments(self.folder)
        path = self.folder / segment_name(self.seq)
        try:
            f = open(path, "ab", buffering=1 << 20)  # noqa: SIM115 - kept open across appends
        except OSError as exc:
            raise AuditError(f"cannot open {path}: {exc.strerror}") from exc
        old, self._f = self._f, f
        if old is not None:
            old.close()
        self._opened_at = time.monotonic()
        _fsync_dir(self.folder)
        self.append("segment", previous_segment=previous[-1].name if previous else None)

    def append(self, kind: str, ts: float | None = None, **fields: Any) -> dict[str, Any]:
        """Add one entry; returns it (with ``seq`` and ``hash``)."""
        entry = {"seq": self.seq, "ts": round(time.time() if ts is None else ts, 6), "kind": kind, **fields,
                 "prev": self.head}
        line, entry["hash"] = seal(entry)
        self._f.write(line)
        self.seq += 1
        self.head = entry["hash"]
        self.entries_total += 1
        return entry

    def flush(self) -> None:
        """Hand the buffered entries to the OS (the sidecar calls this after every analyzed batch)."""
        self._f.flush()

    def checkpoint(self) -> dict[str, Any]:
        """An authenticated checkpoint of the head; fsynced, and written to ``HEAD``."""
        head_seq = self.seq - 1
        entry = self.append("checkpoint", head_seq=head_seq, head=self.head,
                            mac=checkpoint_mac(self.key, head_seq, self.head))
        self._f.flush()
        os.fsync(self._f.fileno())
        tmp = self.folder / ".HEAD.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"seq": entry["seq"], "hash": entry["hash"], "head_seq": head_seq,
                                "head": entry["head"], "mac": entry["mac"]}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / "HEAD")
        _fsync_dir(self.folder)
        self.checkpoint_seq = entry["seq"]
        self._last_checkpoint = time.monotonic()
        return entry

    def maybe_checkpoint(self) -> None:
        """Checkpoint when ``checkpoint_seconds`` passed; rotate (and prune) when the segment is full or old."""
        self._f.flush()
        now = time.monotonic()
        if self._f.tell() >= self.segment_bytes or now - self._opened_at >= self.segment_seconds:
            self.rotate()
        elif now - self._last_checkpoint >= self.checkpoint_seconds:
            self.checkpoint()

    def rotate(self) -> None:
        self.checkpoint()
        self._open_segment()
        self.prune()
        self.checkpoint()

    def prune(self, now: float | None = None) -> list[str]:
        """Remove whole segments older than the retention (never the current one), after recording it."""
        now = time.time() if now is None else now
        old: list[Path] = []
        names = segments(self.folder)
        for path in names[:-1]:
            last, _, _ = last_complete(path)
            if last is None or now - float(last["ts"]) <= self.retention_seconds:
                break
            old.append(path)
        if not old:
            return []
        last, _, _ = last_complete(old[-1])
        assert last is not None
        self.append("pruned", through_seq=int(last["seq"]), through_hash=str(last["hash"]),
                    segments=[p.name for p in old], retention_seconds=self.retention_seconds)
        self.checkpoint()  # the record of the removal is authenticated before anything is removed
        for path in old:
            path.unlink()
        _fsync_dir(self.folder)
        return [p.name for p in old]

    def close(self) -> None:
        if self._f is not None and not self._f.closed:
            self.checkpoint()
            self._f.close()
        if self._lock >= 0:
            os.close(self._lock)  # releases the folder
            self._lock = -1


__all__ = ["GENESIS", "AuditError", "AuditTrail", "checkpoint_mac", "line_hash", "seal", "segments"]
