"""``latentwatch audit verify`` and ``audit export``: check an audit folder's chain, read its entries.

What ``verify`` detects (each named by the first bad entry): a modified entry (its hash), an inserted,
removed or reordered one (``seq`` and ``prev``), a removed segment in the middle (the chain across the
files), removed oldest segments without a ``pruned`` entry for them, a checkpoint whose MAC does not
match the key (a forged chain), a tail cut below ``HEAD`` or below the witness ``--expect-seq``, and a torn
entry (a crash in the middle of a write) that no later writer recorded as recovered. Entries after the
newest checkpoint are reported as not yet authenticated.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor.audit.trail import GENESIS, AuditError, checkpoint_mac, line_hash, segments


@dataclass
class VerifyResult:
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    entries: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    checkpoints: int = 0
    last_checkpoint_seq: int | None = None
    segments: int = 0

    def fail(self, message: str) -> None:
        self.ok = False
        self.problems.append(message)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": self.problems, "warnings": self.warnings, "entries": self.entries,
                "first_seq": self.first_seq, "last_seq": self.last_seq, "checkpoints": self.checkpoints,
                "last_checkpoint_seq": self.last_checkpoint_seq, "segments": self.segments}


def _lines(path: Path) -> Iterator[tuple[int, int, bytes, bool]]:
    """(line number, byte offset, bytes, complete) of each line of a segment."""
    data = path.read_bytes()
    pos, number = 0, 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        number += 1
        if end < 0:
            yield number, pos, data[pos:], False
            return
        yield number, pos, data[pos:end], True
        pos = end + 1


def verify(folder: Path, key: bytes | None = None, expect_seq: int | None = None) -> VerifyResult:
    """Check the whole chain in ``folder``; with ``key``, the checkpoints' MACs too."""
    folder = Path(folder)
    res = VerifyResult()
    files = segments(folder)
    res.segments = len(files)
    if not files:
        res.fail(f"{folder}: no audit segments")
        return res
    expected_seq: int | None = None
    prev = GENESIS
    anchor: tuple[int, str] | None = None  # (seq, prev) of the first entry when older segments were pruned
    pruned: list[tuple[int, str]] = []  # removals recorded before an authenticated checkpoint
    recovered: list[tuple[str, int]] = []
    pending_pruned: list[tuple[int, str]] = []  # not yet followed by a checkpoint: not yet trusted
    pending_recovered: list[tuple[str, int]] = []
    torn: dict[tuple[str, int], int] = {}  # (segment, offset) -> bytes, not yet recovered
    checkpoint_hashes: dict[int, str] = {}
    for path in files:
        first_in_file = True
        for number, offset, raw, complete in _lines(path):
            where = f"{path.name} line {number}"
            if not complete:
                torn[(path.name, offset)] = len(raw)
                break
            try:
                entry = json.loads(raw)
                seq, eprev, ehash = int(entry["seq"]), str(entry["prev"]), str(entry["hash"])
            except (ValueError, KeyError, TypeError):
                res.fail(f"{where}: not a valid entry (modified or inserted)")
                return res
            if first_in_file:
                if path.name != f"segment-{seq:012d}.jsonl" or entry.get("kind") != "segment":
                    res.fail(f"{where}: seq {seq} does not begin segment {path.name} (files renamed or mixed)")
                    return res
                first_in_file = False
            if expected_seq is None:  # the oldest entry left
                res.first_seq = seq
                if seq == 0:
                    if eprev != GENESIS:
                        res.fail(f"{where}: entry 0 does not start from the genesis hash")
                        return res
                else:
                    anchor = (seq, eprev)
                expected_seq, prev = seq, eprev
            if seq != expected_seq:
                what = (f"entries {expected_seq}..{seq - 1} are missing (deleted)" if seq > expected_seq
                        else f"entry {seq} comes after {expected_seq - 1} (reordered or inserted)")
                res.fail(f"{where}: {what}")
                return res
            if eprev != prev:
                res.fail(f"{where}: entry {seq} does not follow entry {seq - 1} (its prev hash differs: "
                         "an entry before it was changed, removed or inserted)")
                return res
            if line_hash(raw) != ehash:
                res.fail(f"{where}: entry {seq} was modified (its hash does not match its content)")
                return res
            kind = entry.get("kind")
            if kind == "checkpoint":
                if entry.get("head_seq") != seq - 1 or entry.get("head") != eprev:
                    res.fail(f"{where}: checkpoint {seq} does not name the entry before it")
                    return res
                if key is not None and not hmac.compare_digest(
                        str(entry.get("mac", "")), checkpoint_mac(key, seq - 1, eprev)):
                    res.fail(f"{where}: checkpoint {seq} is not authenticated by this key (forged, or another key)")
                    return res
                res.checkpoints += 1
                res.last_checkpoint_seq = seq
                checkpoint_hashes[seq] = ehash
                pruned += pending_pruned
                recovered += pending_recovered
                pending_pruned, pending_recovered = [], []
            elif kind == "pruned":
                pending_pruned.append((_int(entry.get("through_seq")), str(entry.get("through_hash", ""))))
            elif kind == "recovered":
                pending_recovered.append((str(entry.get("torn_segment")), _int(entry.get("torn_offset"))))
            res.entries += 1
            res.last_seq = seq
            expected_seq, prev = seq + 1, ehash
    for name, offset in recovered:
        torn.pop((name, offset), None)
    if anchor is not None and (anchor[0] - 1, anchor[1]) not in pruned:
        res.fail(f"{files[0].name}: the trail begins at entry {anchor[0]}, and no pruned entry records the "
                 "removal of the entries before it (deleted)")
    for (name, offset), length in torn.items():
        res.fail(f"{name} byte {offset}: a torn entry ({length} bytes; a crash during a write, or a cut) that "
                 "no later writer recorded as recovered")
    head_path = folder / "HEAD"
    if head_path.exists():
        try:
            head = json.loads(head_path.read_text())
            hseq, hhash, hhead_seq = int(head["seq"]), str(head["hash"]), int(head["head_seq"])
            hhead = str(head["head"])
        except (ValueError, KeyError, TypeError, OSError):
            res.fail(f"{head_path}: unreadable")
            hseq, hhash, hhead_seq, hhead = -1, "", -2, ""
        if hseq < 0:
            pass
        elif hhead_seq != hseq - 1 or (key is not None and not hmac.compare_digest(
                str(head.get("mac", "")), checkpoint_mac(key, hhead_seq, hhead))):
            res.fail(f"{head_path}: not authenticated by this key, or not a checkpoint")
        elif res.last_seq is not None and hseq > res.last_seq:
            res.fail(f"the trail ends at entry {res.last_seq}, but HEAD names checkpoint {hseq}: "
                     f"entries {res.last_seq + 1}..{hseq} were cut off (truncated)")
        elif res.first_seq is not None and hseq >= res.first_seq and checkpoint_hashes.get(hseq) != hhash:
            res.fail(f"HEAD names checkpoint {hseq}, which the trail does not hold as written (changed or removed)")
    else:
        res.warnings.append("no HEAD file: a cut of the tail is detected only with --expect-seq")
    if expect_seq is not None and (res.last_checkpoint_seq or -1) < expect_seq:
        res.fail(f"the witness says checkpoint {expect_seq} was written, the trail's newest is "
                 f"{res.last_checkpoint_seq}: the tail was cut (truncated)")
    if key is None:
        res.warnings.append("checkpoint MACs not checked (no key given): a rewritten chain would pass")
    if res.last_seq is not None and res.last_checkpoint_seq is not None and res.last_seq > res.last_checkpoint_seq:
        res.warnings.append(f"{res.last_seq - res.last_checkpoint_seq} entries after the newest checkpoint are "
                            "not yet authenticated")
    return res


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1


def entries(folder: Path, since: float | None = None, until: float | None = None) -> Iterator[dict[str, Any]]:
    """The complete entries with ``since <= ts < until``, in order."""
    for path in segments(Path(folder)):
        for _, _, raw, complete in _lines(path):
            if not complete:
                break
            entry = json.loads(raw)
            ts = float(entry["ts"])
            if (since is None or ts >= since) and (until is None or ts < until):
                yield entry


def export(folder: Path, out: Path, since: float | None = None, until: float | None = None,
           key: bytes | None = None, fmt: str = "jsonl") -> dict[str, Any]:
    """Verify, then write the entries in the time range to ``out`` (JSONL, or Parquet with pyarrow)."""
    res = verify(folder, key=key)
    if not res.ok:
        raise AuditError(f"the trail does not verify, nothing exported: {res.problems[0]}")
    rows = list(entries(folder, since, until))
    if fmt == "parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise AuditError("Parquet export needs pyarrow: pip install pyarrow (or use --format jsonl)") from exc
        core = ("seq", "ts", "kind", "prev", "hash")
        table = pa.table({**{c: [r[c] for r in rows] for c in core},
                          "fields": [json.dumps({k: v for k, v in r.items() if k not in core}, sort_keys=True)
                                     for r in rows]})
        pq.write_table(table, out)
    elif fmt == "jsonl":
        with open(out, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, sort_keys=True) + "\n")
    else:
        raise AuditError(f"unknown export format {fmt!r} (jsonl or parquet)")
    return {"exported": len(rows), "format": fmt, "out": str(out), "verified": res.to_dict()}


__all__ = ["VerifyResult", "entries", "export", "verify"]
