"""The record codec round-trips and rejects any malformed bytes with RecordError, never a crash."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.record import MAX_PAYLOAD, PREFIX, Record, RecordError, decode, encode
from collectors.sinks import FileReadStats, FileSink, read_file


def make_record(i: int = 0, d: int = 16) -> Record:
    rng = np.random.default_rng(i)
    return Record(
        model="SmolLM2-135M-Instruct", fingerprint="sha256:" + "ab" * 16, key=f"{i:032x}", n_tokens=12 + i,
        sites={"layers.9.resid": {"mean": rng.normal(size=d).astype(np.float32),
                                  "last": rng.normal(size=d).astype(np.float32),
                                  "norm": np.array([3.0, 4.0], np.float32)},
               "layers.9.attn": {"heads": rng.random((9, 4)).astype(np.float32)}},
        ts=1_700_000_000.5 + i, meta={"replica": "pod-1", "route": "/chat"},
    )


def assert_same(a: Record, b: Record, atol: float = 0.0) -> None:
    assert (a.model, a.fingerprint, a.key, a.n_tokens, a.ts, a.meta, a.text) == (
        b.model, b.fingerprint, b.key, b.n_tokens, b.ts, b.meta, b.text)
    assert a.site_dims() == b.site_dims()
    for s in a.sites:
        for n in a.sites[s]:
            np.testing.assert_allclose(a.sites[s][n], b.sites[s][n], atol=atol, rtol=0 if atol == 0 else 1e-3)


def test_binary_round_trip():
    rec = make_record()
    assert_same(decode(encode(rec)), rec)
    assert_same(decode(encode(rec, half=True)), rec, atol=1e-2)
    rec.text = "opted-in text ✓"
    assert_same(decode(encode(rec)), rec)


def test_json_round_trip():
    rec = make_record(3)
    obj = json.loads(json.dumps(rec.to_json()))
    assert_same(Record.from_json(obj), rec)
    with pytest.raises(RecordError):
        Record.from_json({**obj, "schema": 99})
    with pytest.raises(RecordError):
        Record.from_json({k: v for k, v in obj.items() if k != "sites"})


def test_every_truncation_and_bit_flip_is_rejected():
    data = encode(make_record())
    for cut in range(len(data)):
        with pytest.raises(RecordError):
            decode(data[:cut])
    with pytest.raises(RecordError, match="does not match"):
        decode(data + b"\0")
    for pos in range(0, len(data), 7):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        with pytest.raises(RecordError):
            decode(bytes(flipped))


def test_oversized_announcement_is_rejected_without_allocating():
    head = PREFIX.pack(b"LWSR", 1, 0, 0, 10, MAX_PAYLOAD + 1)
    with pytest.raises(RecordError, match="over the limits"):
        decode(head + b"x" * 100)


def test_nan_is_carried_and_flagged():
    rec = make_record()
    rec.sites["layers.9.resid"]["mean"][0] = np.nan
    back = decode(encode(rec))
    assert not back.is_finite()
    assert make_record().is_finite()


def test_unbounded_fields_are_refused_at_encode():
    rec = make_record()
    rec.meta = {f"k{i}": "v" for i in range(17)}
    with pytest.raises(RecordError, match="at most 16"):
        encode(rec)
    rec = make_record()
    rec.key = "not a hash with spaces"
    with pytest.raises(RecordError, match="key"):
        encode(rec)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_never_crash(data):
    with contextlib.suppress(RecordError):
        decode(data)


@pytest.mark.slow  # 300 hypothesis examples: ~11 s here
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_records_fail_cleanly(data):
    """Valid prefix + header rewritten by hypothesis (checksum fixed up): a clean error or a valid record."""
    import struct
    import zlib

    header = data.draw(st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=20))
    base = {"schema": 1, "model": "m", "fingerprint": "f", "ts": 0.0, "key": "k", "n_tokens": 1, "meta": {},
            "arrays": [{"site": "s", "name": "mean", "dtype": "f4", "shape": [2]}]}
    field = data.draw(st.sampled_from([*base, "extra"]))
    base[field] = header
    hbytes = json.dumps(base).encode()
    payload = data.draw(st.binary(max_size=64))
    body = PREFIX.pack(b"LWSR", 1, 0, 0, len(hbytes), len(payload)) + hbytes + payload
    try:
        rec = decode(body + struct.pack("<I", zlib.crc32(body)))
    except RecordError:
        return
    assert isinstance(rec, Record)


def test_file_sink_round_trip_and_damage(tmp_path):
    path = tmp_path / "sig.lwsr"
    recs = [make_record(i) for i in range(10)]
    with FileSink(path) as sink:
        for r in recs:
            sink.write(r)
    back = list(read_file(path))
    assert len(back) == 10
    for a, b in zip(back, recs, strict=False):
        assert_same(a, b)
    # damage record 3 in the middle and cut the last one short
    data = bytearray(path.read_bytes())
    size = len(encode(recs[0]))
    data[3 * size + 40] ^= 0xFF
    path.write_bytes(bytes(data[:-5]))
    stats = FileReadStats()
    back = list(read_file(path, stats))
    assert [r.key for r in back] == [r.key for i, r in enumerate(recs) if i not in (3, 9)]
    assert stats.corrupt == 1
    assert stats.truncated_tail_bytes == size - 5
