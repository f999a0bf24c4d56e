"""Kafka transport against a real Kafka-protocol broker (tansu) on loopback: tap -> broker -> sidecars.

Fault tests: the broker killed while the model serves, a sidecar killed and restarted, two sidecars
sharing one consumer group.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch

from collectors import Tap
from collectors.kafka_sink import KafkaConnection, KafkaSink
from collectors.record import decode, encode
from tests.conftest import TEXTS
from tests.conftest import encode as tokenize
from tests.kafka_broker import Broker, broker, free_port  # noqa: F401 - fixture
from tests.test_analyzer import FP, make_records
from tests.test_sidecar import artifacts, get, metrics, stop, wait_for  # noqa: F401 - fixture

GROUP_TIMEOUTS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 2000}


def sink_for(b: Broker, topic: str, **kwargs) -> KafkaSink:
    sink = KafkaSink(KafkaConnection(bootstrap_servers=b.bootstrap, topic=topic), **kwargs)
    assert sink.connected.wait(30), sink.last_error
    return sink


def produce(sink: KafkaSink, n: int, seed: int, replicas: int = 8, **shift) -> None:
    for i, rec in enumerate(make_records(n, np.random.default_rng(seed), **shift)):
        rec.meta = {"replica": f"pod-{i % replicas}", "tap_sampled": str(i + 1)}
        sink.write(rec)
    sink.flush()


def start_sidecar(artifacts: Path, folder: Path, b: Broker, topic: str, group: str,  # noqa: F811
                  checkpoint: dict | None = None, **kafka):
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = {**({"checkpoint": checkpoint} if checkpoint else {}),
              "baseline": str(artifacts / "baseline.safetensors"), "probes": str(artifacts / "probes"),
              "port": port, "source": {"kind": "kafka", "kafka": {
                  "bootstrap_servers": b.bootstrap, "topic": topic, "group_id": group, "commit_interval_seconds": 0.2,
                  "poll_timeout_seconds": 0.2, **GROUP_TIMEOUTS, **kafka}}}
    (folder / "sidecar.yaml").write_text(json.dumps(config))
    with (folder / "sidecar.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "monitor", "serve", "-c", str(folder / "sidecar.yaml")],
                                stdout=log, stderr=subprocess.STDOUT, text=True)
    wait_for(lambda: get(f"http://127.0.0.1:{port}/readyz")[0] == 200 or proc.poll() is not None, what="readyz")
    assert proc.poll() is None, (folder / "sidecar.log").read_text()
    return proc, port


def per_partition(m: dict, name: str) -> dict[int, float]:
    fam = m.get(name)
    return {int(s.labels["partition"]): s.value for s in fam.samples} if fam else {}


def scalar(m: dict, name: str, **labels) -> float:
    return sum(s.value for s in m[name].samples if all(s.labels.get(k) == v for k, v in labels.items())
               and not s.name.endswith("_created"))


def caught_up(port: int, expected: int) -> dict | None:
    """Metrics once this sidecar has consumed ``expected`` messages and has no lag, else None."""
    m = metrics(port)
    consumed = per_partition(m, "latentwatch_kafka_records_consumed")
    lag = per_partition(m, "latentwatch_kafka_consumer_lag")
    done = sum(consumed.values()) >= expected and lag and not any(lag.values())
    return m if done else None


def ends(b: Broker, topic: str) -> dict[int, int]:
    """End offset of each partition, from the fetch high watermark (ListOffsets under-reports on tansu)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=b.bootstrap, enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(tps)
    consumer.seek_to_beginning()
    out: dict[int, int] = {}
    deadline = time.monotonic() + 30
    while len(out) < len(tps) and time.monotonic() < deadline:
        consumer.poll(timeout_ms=200, max_records=1)
        out = {tp.partition: consumer.highwater(tp) for tp in tps if consumer.highwater(tp) is not None}
    consumer.close()
    return out


@pytest.mark.integration
def test_sidecar_consumes_counts_and_dead_letters_bad_messages(broker, artifacts, tmp_path):  # noqa: F811
    from kafka import KafkaConsumer, KafkaProducer

    topic, dead = broker.create_topic(partitions=2), broker.create_topic(partitions=1)
    sink = sink_for(broker, topic)
    produce(sink, 300, seed=1)
    raw = KafkaProducer(bootstrap_servers=broker.bootstrap)
    good = encode(make_records(1, np.random.default_rng(2))[0])
    foreign = encode(make_records(1, np.random.default_rng(3), fp="sha256:another-model")[0])
    for value in (b"not a record", good[:-7], good[:20] + b"\xff" + good[21:], foreign):
        raw.send(topic, value=value)
    raw.send(topic, key=b"k", value=None)  # a tombstone: no value at all
    raw.close()
    proc, port = start_sidecar(artifacts, tmp_path / "s", broker, topic, f"g-{uuid.uuid4().hex}",
                               dead_letter_topic=dead)
    try:
        m = wait_for(lambda: caught_up(port, 305), what="all 305 messages consumed")
        assert scalar(m, "latentwatch_records_received") == 301  # 300 good + the foreign record
        assert scalar(m, "latentwatch_records_invalid", reason="corrupt") == 4
        assert scalar(m, "latentwatch_records_invalid", reason="fingerprint") == 1
        assert scalar(m, "latentwatch_kafka_dead_letter", reason="corrupt") == 4
        assert scalar(m, "latentwatch_kafka_dead_letter", reason="foreign_model") == 1
        assert scalar(m, "latentwatch_kafka_assigned_partitions") == 2
        assert proc.poll() is None  # nothing was fatal
    finally:
        assert stop(proc)[0] == 0
        sink.close()
    consumer = KafkaConsumer(dead, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)
    copies = list(consumer)
    consumer.close()
    reasons = sorted(dict(c.headers)["latentwatch_reason"].decode() for c in copies)
    assert reasons == ["corrupt"] * 4 + ["foreign_model"]
    assert all(dict(c.headers)["latentwatch_origin"].decode().startswith(f"{topic}/") for c in copies)
    assert b"not a record" in {c.value for c in copies}


@pytest.mark.integration
def test_restarted_sidecar_resumes_from_committed_offsets(broker, artifacts, tmp_path):  # noqa: F811
    from kafka.admin import KafkaAdminClient

    topic, group, total = broker.create_topic(partitions=3), f"g-{uuid.uuid4().hex}", 20_000
    sink = sink_for(broker, topic)
    produce(sink, total, seed=4)
    assert sink.acked == total and sink.dropped == 0
    proc, port = start_sidecar(artifacts, tmp_path / "a", broker, topic, group, max_poll_records=50)

    def some_committed():
        m = metrics(port)
        return m if sum(per_partition(m, "latentwatch_kafka_committed_offset").values()) >= 500 else None

    m = wait_for(some_committed, what="some offsets committed")
    proc.kill()  # no goodbye: whatever was consumed after the last commit is read again
    proc.wait(10)
    # one consistent scrape: offsets are committed only for records already consumed and accounted
    consumed, committed_seen = per_partition(m, "latentwatch_kafka_records_consumed"), per_partition(
        m, "latentwatch_kafka_committed_offset")
    assert all(consumed[p] >= off for p, off in committed_seen.items())
    admin = KafkaAdminClient(bootstrap_servers=broker.bootstrap)
    committed = {tp.partition: om.offset for tp, om in admin.list_group_offsets(group)[group].items()}
    admin.close()
    assert all(committed[p] >= off for p, off in committed_seen.items())
    assert sum(committed.values()) < total  # killed mid-stream

    proc, port = start_sidecar(artifacts, tmp_path / "b", broker, topic, group)
    try:
        m = wait_for(lambda: caught_up(port, total - sum(committed.values())), what="the rest consumed")
        second = per_partition(m, "latentwatch_kafka_records_consumed")
        # resumed exactly at the committed offsets: [0, committed) was accounted by the first run,
        # [committed, end) by the second, nothing skipped and nothing before the offsets read again
        assert second == {p: total_p - committed.get(p, 0) for p, total_p in ends(broker, topic).items()
                          if total_p - committed.get(p, 0) > 0}
        assert scalar(m, "latentwatch_records_received") == sum(second.values())
    finally:
        assert stop(proc)[0] == 0
        sink.close()


@pytest.mark.integration
def test_two_sidecars_split_the_partitions(broker, artifacts, tmp_path):  # noqa: F811
    topic, group, total = broker.create_topic(partitions=4), f"g-{uuid.uuid4().hex}", 3000
    procs = [start_sidecar(artifacts, tmp_path / f"s{i}", broker, topic, group) for i in range(2)]
    try:
        def balanced():
            counts = [scalar(metrics(port), "latentwatch_kafka_assigned_partitions") for _, port in procs]
            return counts if sum(counts) == 4 and all(counts) else None

        wait_for(balanced, timeout=60, what="both group members own partitions")
        sink = sink_for(broker, topic, key_by="none")
        produce(sink, total, seed=5)
        assert sink.acked == total
        sink.close()

        def both_done():
            ms = [metrics(port) for _, port in procs]
            consumed = [per_partition(m, "latentwatch_kafka_records_consumed") for m in ms]
            lags = [per_partition(m, "latentwatch_kafka_consumer_lag") for m in ms]
            ok = sum(sum(c.values()) for c in consumed) >= total and all(lg and not any(lg.values()) for lg in lags)
            return (ms, consumed) if ok else None

        ms, consumed = wait_for(both_done, timeout=60, what="both sidecars caught up")
        assert not set(consumed[0]) & set(consumed[1])  # no partition read by both
        assert set(consumed[0]) | set(consumed[1]) == {0, 1, 2, 3}
        assert sum(sum(c.values()) for c in consumed) == total  # every record exactly once
        assert all(scalar(m, "latentwatch_records_received") > 0 for m in ms)
    finally:
        for proc, _ in procs:
            assert stop(proc)[0] == 0


@pytest.mark.integration
def test_broker_outage_never_blocks_serving(smollm2, tmp_path):
    """Kill the broker while the model serves: the forward pass does not wait, drops are counted, and
    records flow again once a broker is back on the same address."""
    from kafka import KafkaConsumer

    b = Broker().start()
    topic = b.create_topic(partitions=1)
    lm = smollm2
    batch = tokenize(lm, TEXTS)
    sink = KafkaSink(KafkaConnection(bootstrap_servers=b.bootstrap, topic=topic), buffer_bytes=64 << 10,
                     delivery_timeout_ms=3_000, flush_timeout_s=2)
    assert sink.connected.wait(30), sink.last_error
    tap = Tap(lm.model, ["layers.9.resid", "layers.19.resid", "layers.29.resid"], sink=sink, sample_rate=1.0,
              queue_size=64).attach()

    def serve(n: int) -> tuple[float, float]:
        """n forwards; returns (median forward seconds, tap hook seconds per forward)."""
        hooks0, times = tap.stats.hook_seconds, []
        for _ in range(n):
            t0 = time.perf_counter()
            with torch.no_grad():
                lm.model(**batch)
            times.append(time.perf_counter() - t0)
        return float(np.median(times)), (tap.stats.hook_seconds - hooks0) / n

    try:
        normal, hooks_normal = serve(10)
        assert tap.flush(60)
        assert sink.acked == tap.stats.records_emitted == 40 and sink.dropped == 0

        b.kill()
        during, hooks_down = serve(30)  # 120 records of ~7 KB: far more than the 64 KiB buffer holds
        assert tap.flush(60)
        wait_for(lambda: sink.dropped_delivery + sink.dropped_buffer_full >= 80, timeout=30, what="drops counted")
        # the serving thread spends the same tiny time in the tap whether or not the broker is there
        assert hooks_down < 0.05 * normal and hooks_normal < 0.05 * normal
        assert tap.stats.dropped_queue_full == 0  # the sink never held up the tap's worker either
        assert tap.stats.sink_errors == 0 and tap.stats.hook_errors == 0

        acked_at_restart = sink.acked  # nothing is acked while the broker is down
        b.start()  # same address, empty (in-memory) broker: the topic is created again
        b.create_topic(topic, partitions=1)
        wait_for(lambda: sink.buffered_bytes == 0, timeout=30, what="buffer released")
        acked_before = sink.acked

        def flows_again():
            serve(2)
            tap.flush(30)
            return sink.acked > acked_before

        wait_for(flows_again, timeout=60, what="records flowing after the broker returned")
        sink.flush()
        assert sink.written - sink.acked - sink.dropped_delivery == 0  # nothing left in flight
        assert tap.stats.records_emitted == sink.acked + sink.dropped  # every record delivered or counted
        consumer = KafkaConsumer(topic, bootstrap_servers=b.bootstrap, auto_offset_reset="earliest",
                                 consumer_timeout_ms=5000)
        delivered = list(consumer)
        consumer.close()
        # the returned broker started empty: it holds exactly what the sink had acked since then
        assert len(delivered) == sink.acked - acked_at_restart >= 1
        # the monitor learns about the outage's drops from the next delivered record
        assert int(decode(delivered[-1].value).meta["sink_dropped"]) >= 80
        print(json.dumps({"forward_ms_normal": round(1000 * normal, 2), "forward_ms_broker_down":
                          round(1000 * during, 2), "hook_ms_per_forward": round(1000 * hooks_down, 3)}))
    finally:
        tap.detach()
        sink.close()
        b.kill()


@pytest.mark.slow  # waits out the client's connection attempts: ~5 s
def test_unreachable_broker_is_not_fatal():
    """No broker at all: the sink counts drops, never raises; closing it does not hang."""
    port = free_port()
    sink = KafkaSink(KafkaConnection(bootstrap_servers=f"127.0.0.1:{port}", topic="t"))
    for rec in make_records(5, np.random.default_rng(0), fp=FP):
        sink.write(rec)
    assert sink.dropped_unavailable == 5 and not sink.connected.is_set()
    t0 = time.monotonic()
    sink.close()
    assert time.monotonic() - t0 < 30


def test_missing_codec_is_a_clear_error():
    with pytest.raises(ValueError, match="compression_type 'brotli'"):
        KafkaSink(KafkaConnection(bootstrap_servers="127.0.0.1:1", topic="t"), compression_type="brotli")


@pytest.mark.integration
def test_sidecar_reports_a_lost_broker_and_recovers(artifacts, tmp_path):  # noqa: F811
    b = Broker().start()
    topic = b.create_topic(partitions=1)
    proc, port = start_sidecar(artifacts, tmp_path / "s", b, topic, f"g-{uuid.uuid4().hex}")
    try:
        wait_for(lambda: scalar(metrics(port), "latentwatch_kafka_connected") == 1, what="connected")
        b.kill()
        wait_for(lambda: scalar(metrics(port), "latentwatch_kafka_connected") == 0, what="disconnection noticed")
        assert get(f"http://127.0.0.1:{port}/readyz")[0] == 503 and proc.poll() is None  # still serving
        b.start()
        b.create_topic(topic, partitions=1)
        wait_for(lambda: scalar(metrics(port), "latentwatch_kafka_connected") == 1, timeout=90, what="reconnected")
        sink = sink_for(b, topic)
        produce(sink, 50, seed=6)
        sink.close()
        wait_for(lambda: scalar(metrics(port), "latentwatch_records_received") == 50, timeout=90,
                 what="records analyzed after the broker returned")
    finally:
        assert stop(proc)[0] == 0
        b.kill()
