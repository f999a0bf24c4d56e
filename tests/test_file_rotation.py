"""Files that rotate and tails that never lose: FileSink rotation, the file source following rename and
truncate rotation by identity, torn writes skipped and counted, positions that survive a restart."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from collectors.record import encode
from collectors.sinks import FileSink
from monitor.sidecar.file_source import FileTail
from tests.test_analyzer import make_records


def records(n: int, start: int = 0, seed: int = 0):
    out = make_records(n, np.random.default_rng(seed + start))
    for i, r in enumerate(out):
        r.key = f"{start + i:032x}"
        r.ts = 1.7e9 + start + i
    return out


def keys(recs) -> list[int]:
    return [int(r.key, 16) for r in recs]


def drain(tail: FileTail) -> list:
    out = []
    while got := tail.poll():
        out += got
    return out + tail.poll()


def test_filesink_rotates_by_size_and_count(tmp_path):
    size = len(encode(records(1)[0]))
    sink = FileSink(tmp_path / "live.lwsr", max_bytes=10 * size, backups=2)
    for r in records(95):
        sink.write(r)
    sink.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["live.lwsr", "live.lwsr.1", "live.lwsr.2"]
    assert all(p.stat().st_size <= 10 * size for p in tmp_path.iterdir())
    assert sink.rotations == 9
    from collectors.sinks import read_file

    kept = [int(r.key, 16) for p in ("live.lwsr.2", "live.lwsr.1", "live.lwsr") for r in read_file(tmp_path / p)]
    assert kept == list(range(70, 95))  # the newest (backups + 1) files, whole records, in order
    with pytest.raises(ValueError):
        FileSink(tmp_path / "x", max_bytes=10)


@pytest.mark.parametrize("backups", [1, 3, 20])
def test_tail_follows_rename_rotation_without_loss(tmp_path, backups):
    path = tmp_path / "live.lwsr"
    size = len(encode(records(1)[0]))
    sink = FileSink(path, max_bytes=7 * size, backups=backups)
    tail = FileTail(path)
    got = []
    n = 0
    for burst in (1, 5, 6, 7, 8, 15, 3, 1, 30 if backups > 3 else 12):  # up to 4 rotations between two polls
        for r in records(burst, n):
            sink.write(r)
        sink.flush()
        n += burst
        got += drain(tail)
    sink.close()
    got += drain(tail)
    tail.close()
    assert keys(got) == list(range(n))
    assert tail.stats.corrupt == 0 and tail.rotations_followed == sink.rotations


def test_tail_follows_truncation_even_when_regrown(tmp_path):
    path = tmp_path / "live.lwsr"
    with FileSink(path, max_bytes=None) as sink:
        for r in records(50):
            sink.write(r)
    tail = FileTail(path)
    assert keys(drain(tail)) == list(range(50))
    with path.open("r+b") as f:  # copytruncate, then the writer goes on: more bytes than before
        f.truncate(0)
    with FileSink(path, max_bytes=None) as sink:
        for r in records(80, 50):
            sink.write(r)
    assert keys(drain(tail)) == list(range(50, 130))
    assert tail.truncations == 1 and tail.stats.corrupt == 0
    with path.open("r+b") as f:  # truncated to fewer bytes
        f.truncate(0)
    with FileSink(path, max_bytes=None) as sink:
        for r in records(3, 130):
            sink.write(r)
    assert keys(drain(tail)) == [130, 131, 132]
    tail.close()


@pytest.mark.parametrize("cut", [6, 12, 300])
def test_a_torn_write_is_skipped_and_counted_not_a_stall(tmp_path, cut):
    path = tmp_path / "live.lwsr"
    torn = encode(records(1, 999)[0])
    with path.open("wb") as f:
        f.write(b"".join(encode(r) for r in records(10)))
        f.write(torn[:cut])  # the writer died mid-record; a new one appends after it
        f.write(b"".join(encode(r) for r in records(10, 10)))
    with FileTail(path) as tail:
        assert keys(drain(tail)) == list(range(20))
    assert tail.stats.corrupt == 1


def test_position_survives_a_restart_across_rotations(tmp_path):
    path = tmp_path / "live.lwsr"
    size = len(encode(records(1)[0]))
    sink = FileSink(path, max_bytes=10 * size, backups=5)
    tail = FileTail(path)
    for r in records(25):
        sink.write(r)
    sink.flush()
    first = tail.poll(limit=7 * size + 5)
    assert keys(first) == list(range(7))  # stopped mid-record: the position is the last record boundary
    pos = tail.position()
    tail.close()
    assert pos is not None and pos["offset"] % size == 0
    for r in records(33, 25):  # two more rotations while "stopped"
        sink.write(r)
    sink.close()
    resumed = FileTail(path, from_start=False, position=pos)
    assert keys(first + drain(resumed)) == list(range(58))
    assert resumed.stats.corrupt == 0

    # the position in the live file, and a file truncated while stopped: read again from the start
    pos = resumed.position()
    resumed.close()
    with FileTail(path, position=pos) as t:
        assert keys(drain(t)) == []
    os.truncate(path, 0)
    with FileSink(path, max_bytes=None) as s2:
        for r in records(4, 100):
            s2.write(r)
    with FileTail(path, position=pos) as t:
        assert keys(drain(t)) == [100, 101, 102, 103]


def test_position_of_a_file_rotated_away_reads_what_remains(tmp_path):
    path = tmp_path / "live.lwsr"
    size = len(encode(records(1)[0]))
    sink = FileSink(path, max_bytes=5 * size, backups=1)
    for r in records(5):
        sink.write(r)
    sink.flush()
    tail = FileTail(path)
    drain(tail)
    pos = tail.position()
    tail.close()
    for r in records(20, 5):
        sink.write(r)
    sink.close()
    with FileTail(Path(path), position=pos) as resumed:
        assert keys(drain(resumed)) == list(range(15, 25))
    assert resumed.lost_files == 1
