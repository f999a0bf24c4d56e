"""The audit trail: a chain that detects each kind of tampering, survives rotation, retention and a crash
in the middle of a write, and the ``audit verify`` / ``audit export`` commands."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from monitor.audit.trail import AuditTrail, segments
from monitor.audit.verify import entries, verify
from tests.test_cli import run_cli

KEY = b"audit-key-for-tests-0123456789"


def trail_of(folder: Path, n: int = 30, **kw) -> Path:
    t = AuditTrail(folder, KEY, start={"model": "m"}, **kw)
    for i in range(n):
        t.append("record", key=f"{i:08x}", scores={"insult": i / n})
        t.maybe_checkpoint()
        if i % 10 == 9:
            t.checkpoint()
    t.close()
    return folder


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_an_untouched_trail_verifies_with_the_key(tmp_path):
    folder = trail_of(tmp_path / "a")
    res = verify(folder, key=KEY)
    assert res.ok, res.problems
    assert res.entries == res.last_seq + 1 and res.checkpoints >= 4
    assert not verify(folder, key=b"another-key-of-enough-length").ok  # the MACs tie the chain to the key


@pytest.mark.parametrize("tamper, expected", [
    ("modify", "was modified"),
    ("delete", "missing"),
    ("insert", "reordered or inserted"),
    ("reorder", "does not follow"),
    ("truncate", "truncated"),
    ("rehash", "not authenticated"),
])
def test_each_kind_of_tampering_is_named(tmp_path, tamper, expected):
    folder = trail_of(tmp_path / "t")
    seg = segments(folder)[-1]
    ls = lines(seg)
    if tamper == "modify":
        ls[10] = ls[10].replace(b'"insult":0.', b'"insult":9.')
    elif tamper == "delete":
        del ls[10]
    elif tamper == "insert":
        ls.insert(11, ls[5])
    elif tamper == "reorder":
        ls[10], ls[11] = ls[11], ls[10]
        ls[10] = ls[10].replace(b'"seq":11', b'"seq":10')
        ls[11] = ls[11].replace(b'"seq":10', b'"seq":11')
    elif tamper == "truncate":
        ls = ls[:12]  # whole lines cut: only HEAD tells
    elif tamper == "rehash":  # a rewritten chain: every hash recomputed, but the MACs cannot be
        from monitor.audit.trail import seal
        prev = None
        out = []
        for raw in ls:
            e = json.loads(raw)
            del e["hash"]
            if e["seq"] == 10:
                e["scores"] = {"insult": 0.0}
            if prev is not None:
                e["prev"] = prev
                if e["kind"] == "checkpoint":
                    e["head"] = prev
            line, prev = seal(e)
            out.append(line)
        ls = out
        (folder / "HEAD").unlink()
    seg.write_bytes(b"".join(ls))
    res = verify(folder, key=KEY)
    assert not res.ok
    assert expected in res.problems[0], res.problems


def test_a_cut_tail_with_head_removed_is_caught_by_the_witness(tmp_path):
    folder = trail_of(tmp_path / "w")
    newest = verify(folder, key=KEY).last_checkpoint_seq
    seg = segments(folder)[-1]
    seg.write_bytes(b"".join(lines(seg)[:12]))
    (folder / "HEAD").unlink()
    assert verify(folder, key=KEY).ok  # nothing inside the folder can tell
    res = verify(folder, key=KEY, expect_seq=newest)
    assert not res.ok and "truncated" in res.problems[0]


class Clock:
    """The trail's clock, moved by hand (retention is days; the test cannot wait)."""

    def __init__(self) -> None:
        self.now = time.time() - 7200

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def test_rotation_and_retention_keep_what_remains_verifiable(tmp_path, monkeypatch):
    folder = tmp_path / "r"
    clock = Clock()
    monkeypatch.setattr("monitor.audit.trail.time", clock)
    t = AuditTrail(folder, KEY, segment_bytes=2_000, retention_seconds=3600)
    for i in range(200):
        clock.now += 72 if i < 100 else 1  # 100 entries over two hours, then 100 in the last minutes
        t.append("record", key=f"{i:08x}")
        t.maybe_checkpoint()
    t.close()
    assert len(segments(folder)) > 5
    pruned = [e for e in entries(folder) if e["kind"] == "pruned"]
    assert pruned  # at rotation: the segments whose newest entry is older than an hour
    res = verify(folder, key=KEY)
    assert res.ok, res.problems
    assert res.first_seq == pruned[-1]["through_seq"] + 1
    assert all(e["ts"] >= clock.now - 3600 - 72 for e in entries(folder))  # nothing older than the retention left
    segments(folder)[1].unlink()  # a segment removed without a pruned entry: caught
    assert "missing" in verify(folder, key=KEY).problems[0]


def test_the_oldest_segment_removed_by_hand_is_caught(tmp_path):
    folder = trail_of(tmp_path / "o", n=200, segment_bytes=2_000)
    segments(folder)[0].unlink()
    res = verify(folder, key=KEY)
    assert not res.ok and "no pruned entry" in res.problems[0]


def test_a_torn_last_entry_is_reported_and_the_next_writer_records_it(tmp_path):
    folder = trail_of(tmp_path / "c")
    seg = segments(folder)[-1]
    with open(seg, "ab") as f:
        f.write(b'{"seq":99,"ts":1.0,"ki')  # the crash in the middle of a write
    res = verify(folder, key=KEY)
    assert not res.ok and "torn entry" in res.problems[0]
    t = AuditTrail(folder, KEY)  # restart after the crash
    t.append("record", key="after")
    t.close()
    res = verify(folder, key=KEY)
    assert res.ok, res.problems
    recovered = [e for e in entries(folder) if e["kind"] == "recovered"]
    assert recovered and recovered[0]["torn_segment"] == seg.name and recovered[0]["torn_bytes"] == 22


@pytest.mark.integration  # the command in a subprocess
def test_cli_verify_and_export(tmp_path):
    folder = trail_of(tmp_path / "x")
    (tmp_path / "key").write_bytes(KEY)
    ok = run_cli("audit", "verify", str(folder), "--key-file", str(tmp_path / "key"))
    assert ok.returncode == 0, ok.stderr
    out = tmp_path / "export.jsonl"
    res = run_cli("audit", "export", str(folder), "--out", str(out), "--key-file", str(tmp_path / "key"))
    assert res.returncode == 0, res.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sum(r["kind"] == "record" for r in rows) == 30
    seg = segments(folder)[-1]
    seg.write_bytes(seg.read_bytes().replace(b'"key":"00000003"', b'"key":"0000000f"'))
    bad = run_cli("audit", "verify", str(folder), "--key-file", str(tmp_path / "key"))
    assert bad.returncode == 1 and "modified" in bad.stdout + bad.stderr and "Traceback" not in bad.stderr
    refused = run_cli("audit", "export", str(folder), "--out", str(tmp_path / "none.jsonl"))
    assert refused.returncode == 1 and "does not verify" in refused.stderr
    assert not (tmp_path / "none.jsonl").exists()


def test_the_sidecar_audits_every_record_and_alarm_without_text(tmp_path):
    from monitor.sidecar.service import Sidecar
    from monitor.sidecar.settings import Settings
    from tests.test_restart import stream
    from tests.test_sidecar import make_artifacts

    (tmp_path / "art").mkdir()
    art = make_artifacts(tmp_path / "art")
    (tmp_path / "key").write_bytes(KEY)
    audit = {"enabled": True, "dir": tmp_path / "audit", "key_file": tmp_path / "key"}
    sc = Sidecar(Settings(baseline=art / "baseline.safetensors", probes=art / "probes", source={"kind": "none"},
                          audit=audit))
    recs = stream(300, 0) + stream(300, 300, concept_shift=2.0)
    for r in recs:
        r.text = "a request the user typed"
    recs[5].fingerprint = "another-model"
    fired = sc.ingest(recs)
    sc.close_audit()
    assert fired  # the surge fires an alarm
    res = verify(tmp_path / "audit", key=KEY)
    assert res.ok, res.problems
    got = list(entries(tmp_path / "audit"))
    records = [e for e in got if e["kind"] == "record"]
    alarms = [e for e in got if e["kind"] == "alarm"]
    assert [e["key"] for e in records] == [r.key for r in recs]
    assert records[5]["invalid"] == "fingerprint" and "scores" not in records[5]
    assert set(records[0]["scores"]) == set(sc.probes.concepts)
    assert not any("text" in e for e in got)  # no raw text unless include_text
    assert {a["detector"] for a in alarms} == {e.detector for e in fired}
    by_seq = {e["seq"]: e for e in records}
    for a in alarms:  # the window an alarm rests on: the records it covers, named by seq
        first, last = by_seq[a["records_from_seq"]], by_seq[a["records_to_seq"]]
        assert last["ordinal"] == a["at_ordinal"] and last["ordinal"] - first["ordinal"] + 1 == a["window"]
    assert set(records[-1]["alarms"]) == {st.slot.name for st in sc.analyzer.states if st.alarm}
    start = next(e for e in got if e["kind"] == "start")
    assert start["baseline_sha256"] == sc.baseline_sha256 and start["probes_sha256"]


def test_one_writer_per_folder(tmp_path):
    from monitor.audit.trail import AuditError

    first = AuditTrail(tmp_path / "l", KEY)
    with pytest.raises(AuditError, match="another writer"):
        AuditTrail(tmp_path / "l", KEY)
    first.close()
    AuditTrail(tmp_path / "l", KEY).close()  # released at close


@pytest.mark.parametrize("leftover", [b"", b'{"seq":'])
def test_a_crash_right_after_a_new_segment_does_not_block_the_next_start(tmp_path, leftover):
    folder = trail_of(tmp_path / "e")
    nxt = verify(folder, key=KEY).last_seq + 1
    (folder / f"segment-{nxt:012d}.jsonl").write_bytes(leftover)  # created; crashed before (or during) entry 1
    AuditTrail(folder, KEY).close()
    res = verify(folder, key=KEY)
    assert res.ok, res.problems


def test_an_unauthenticated_pruned_entry_does_not_excuse_a_deletion(tmp_path):
    from monitor.audit.trail import seal

    folder = trail_of(tmp_path / "p", n=200, segment_bytes=2_000)
    first = segments(folder)[0]
    last_removed = json.loads(first.read_bytes().splitlines()[-1])
    first.unlink()
    seg = segments(folder)[-1]
    tail = json.loads(seg.read_bytes().splitlines()[-1])
    forged = {"seq": tail["seq"] + 1, "ts": tail["ts"], "kind": "pruned", "through_seq": last_removed["seq"],
              "through_hash": last_removed["hash"], "prev": tail["hash"]}
    with open(seg, "ab") as f:
        f.write(seal(forged)[0])  # a correct chain, but no checkpoint (MAC) after it
    res = verify(folder, key=KEY)
    assert not res.ok and "no pruned entry" in res.problems[0]


def test_head_lowered_after_a_cut_is_caught(tmp_path):
    folder = trail_of(tmp_path / "h")
    seg = segments(folder)[-1]
    seg.write_bytes(b"".join(lines(seg)[:12]))
    head = json.loads((folder / "HEAD").read_text())
    head["seq"] = 11
    (folder / "HEAD").write_text(json.dumps(head))
    res = verify(folder, key=KEY)
    assert not res.ok and "HEAD" in res.problems[0]


@pytest.mark.integration  # a real `latentwatch serve`
def test_serve_writes_a_trail_that_verifies_against_its_own_witness(tmp_path):
    from collectors.sinks import FileSink
    from tests.test_restart import received, stream
    from tests.test_sidecar import make_artifacts, metrics, start, stop, wait_for

    (tmp_path / "art").mkdir()
    art = make_artifacts(tmp_path / "art")
    (tmp_path / "key").write_bytes(KEY)
    audit = {"enabled": True, "dir": str(tmp_path / "audit"), "key_file": str(tmp_path / "key"),
             "checkpoint_seconds": 0.2}
    proc, port, live = start(art, tmp_path, audit=audit)
    try:
        with FileSink(live) as sink:
            for r in stream(400, 0):
                sink.write(r)
        wait_for(lambda: received(port) >= 400, what="400 records")
        witness = wait_for(lambda: metrics(port)["latentwatch_audit_checkpoint_seq"].samples[0].value >= 400 and
                           metrics(port)["latentwatch_audit_checkpoint_seq"].samples[0].value, what="a checkpoint")
    finally:
        assert stop(proc)[0] == 0
    res = verify(tmp_path / "audit", key=KEY, expect_seq=int(witness))
    assert res.ok, res.problems
    assert sum(e["kind"] == "record" for e in entries(tmp_path / "audit")) == 400
