"""State that survives restarts: windows, alarm state, counters and the reading position are checkpointed
and restored, through the file source (with rotations while stopped) and Kafka: nothing lost, nothing
counted twice, no alarm fired again."""

from __future__ import annotations

import signal
import threading
import uuid

import numpy as np
import pytest

from collectors.record import decode, encode
from collectors.sinks import FileSink
from monitor.analysis.analyzer import Analyzer
from monitor.analysis.baseline import Baseline
from monitor.probes.probe import ProbeSet
from monitor.sidecar.service import Sidecar
from monitor.sidecar.settings import Settings
from tests.kafka_broker import broker  # noqa: F401 - fixture
from tests.test_analyzer import FP, make_records
from tests.test_kafka import caught_up, scalar, sink_for, start_sidecar
from tests.test_sidecar import ingest_port, make_artifacts, metrics, start, stop, wait_for
from tests.test_sidecar_security import post

pytestmark = pytest.mark.integration  # real sidecars (subprocesses), a Kafka broker


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return make_artifacts(tmp_path_factory.mktemp("restart"))


def stream(n: int, start: int, **shift):
    recs = make_records(n, np.random.default_rng(1000 + start), **shift)
    for i, r in enumerate(recs):
        r.key, r.ts = f"{start + i:032x}", 1.7e9 + start + i
        r.meta = {"replica": "pod-0", "tap_sampled": str(start + i + 1)}
    return recs


def received(port: int) -> float:
    return metrics(port)["latentwatch_records_received"].samples[0].value


def statistics(port: int) -> dict[str, float]:
    return {s.labels["detector"]: s.value for s in metrics(port)["latentwatch_drift_statistic"].samples}


def alarms(port: int) -> dict[str, float]:
    return {s.labels["detector"]: s.value for s in metrics(port)["latentwatch_drift_alarms"].samples
            if s.name.endswith("_total")}


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_file_source_restart_with_rotations_loses_and_repeats_nothing(artifacts, tmp_path, how):
    ckpt = {"path": str(tmp_path / "state" / "ckpt"), "interval_seconds": 0.2}
    proc, port, live = start(artifacts, tmp_path, checkpoint=ckpt,
                             source={"kind": "file", "path": str(tmp_path / "live.lwsr"), "from_start": False,
                                     "poll_seconds": 0.05})
    sink = FileSink(live, max_bytes=60 * 1024, backups=10)  # ~200 records a file
    allrecs = stream(700, 0) + stream(500, 700, concept_shift=2.0)
    for r in allrecs[:400]:
        sink.write(r)
    sink.flush()
    wait_for(lambda: received(port) >= 400, what="the first 400")
    if how == signal.SIGTERM:
        assert stop(proc)[0] == 0
    else:  # no goodbye: restored from the last periodic checkpoint, the records after it are read again
        for r in allrecs[400:450]:
            sink.write(r)
        sink.flush()
        wait_for(lambda: received(port) >= 450, what="450")
        proc.kill()
        proc.communicate(timeout=10)  # closes its pipes
    for r in allrecs[450 if how == signal.SIGKILL else 400 : 900]:  # written while stopped, across rotations
        sink.write(r)
    sink.flush()
    proc, port, _ = start(artifacts, tmp_path, checkpoint=ckpt,
                          source={"kind": "file", "path": str(live), "from_start": False, "poll_seconds": 0.05})
    try:
        for r in allrecs[900:]:
            sink.write(r)
        sink.close()
        assert sink.rotations >= 4
        wait_for(lambda: received(port) >= len(allrecs), what="all records")
        assert received(port) == len(allrecs)  # nothing lost, nothing counted twice
        reference = Analyzer(Baseline.load(artifacts / "baseline.safetensors"),
                             ProbeSet.load_dir(artifacts / "probes", fingerprint=FP), log_alarms=False)
        reference.update(allrecs)
        assert statistics(port) == pytest.approx({st.slot.name: st.value for st in reference.states}, rel=1e-6)
        assert alarms(port) == {st.slot.name: st.alarms_total for st in reference.states}
    finally:
        assert stop(proc)[0] == 0


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL])
def test_an_alarm_does_not_fire_again_after_a_restart(artifacts, tmp_path, how):
    # no periodic checkpoint within the test: SIGTERM writes one; a kill -9 finds the one written when
    # the alarm fired (without it, the restart would begin with empty windows and fire the alarm again)
    ckpt = {"path": str(tmp_path / "ckpt"), "interval_seconds": 30}
    proc, port, live = start(artifacts, tmp_path, checkpoint=ckpt)
    with FileSink(live) as sink:
        for r in stream(300, 0) + stream(300, 300, concept_shift=2.0):
            sink.write(r)
    wait_for(lambda: received(port) >= 600, what="600")
    before = alarms(port)
    assert before["rate:scores"] == 1
    if how == signal.SIGTERM:
        assert stop(proc)[0] == 0
    else:
        proc.kill()
        proc.communicate(timeout=10)
    proc, port, _ = start(artifacts, tmp_path, checkpoint=ckpt)
    try:
        assert alarms(port) == before
        with FileSink(live) as sink:
            for r in stream(300, 600, concept_shift=2.0):
                sink.write(r)
        wait_for(lambda: received(port) >= 900, what="900")
        assert alarms(port) == before  # still above threshold: the same alarm, not a new one
        alarm = {s.labels["detector"]: s.value for s in metrics(port)["latentwatch_drift_alarm"].samples}
        assert alarm["rate:scores"] == 1
    finally:
        code, err = stop(proc)
    assert code == 0
    assert "restored" in err and "DRIFT" not in err  # the second run began from the state, fired nothing


def test_checkpoint_of_another_baseline_is_ignored(artifacts, tmp_path, tmp_path_factory):
    other = tmp_path_factory.mktemp("other")
    make_artifacts(other)  # same records, built again: another checksum (creation time)
    ckpt = {"path": str(tmp_path / "ckpt"), "interval_seconds": 30}
    proc, port, live = start(artifacts, tmp_path, checkpoint=ckpt)
    with FileSink(live) as sink:
        for r in stream(150, 0):
            sink.write(r)
    wait_for(lambda: received(port) >= 150, what="150")
    assert stop(proc)[0] == 0
    (tmp_path / "live.lwsr").unlink()
    proc, port, _ = start(other, tmp_path, checkpoint=ckpt)
    try:
        assert received(port) == 0
    finally:
        _, err = stop(proc)
    assert "made with another baseline" in err


def test_kafka_restart_restores_windows_without_loss_or_duplicates(broker, artifacts, tmp_path):  # noqa: F811
    topic, group = broker.create_topic(partitions=1), f"g-{uuid.uuid4().hex}"
    sink = sink_for(broker, topic)
    allrecs = stream(600, 0) + stream(400, 600, concept_shift=2.0)
    ckpt = {"checkpoint": {"path": str(tmp_path / "ckpt"), "interval_seconds": 0.2}}

    def produce(recs):
        for r in recs:
            sink.write(r)
        sink.flush()

    produce(allrecs[:500])
    proc, port = start_sidecar(artifacts, tmp_path / "a", broker, topic, group, max_poll_records=50, **ckpt)
    wait_for(lambda: received(port) >= 300, what="300 consumed")
    proc.kill()  # mid-stream, no goodbye
    proc.wait(10)
    produce(allrecs[500:800])
    proc, port = start_sidecar(artifacts, tmp_path / "b", broker, topic, group, **ckpt)
    try:
        wait_for(lambda: received(port) >= 800 and caught_up(port, 0), what="800")
        assert stop(proc)[0] == 0  # a clean stop too
        produce(allrecs[800:])
        proc, port = start_sidecar(artifacts, tmp_path / "c", broker, topic, group, **ckpt)
        m = wait_for(lambda: received(port) >= len(allrecs) and caught_up(port, 0), what="all")
        assert scalar(m, "latentwatch_records_received") == len(allrecs)
        from kafka import KafkaConsumer

        consumer = KafkaConsumer(topic, bootstrap_servers=broker.bootstrap, auto_offset_reset="earliest",
                                 consumer_timeout_ms=5000)
        in_topic = [decode(msg.value) for msg in consumer]  # the order the broker holds (retries may reorder)
        consumer.close()
        assert sorted(r.key for r in in_topic) == sorted(r.key for r in allrecs)
        reference = Analyzer(Baseline.load(artifacts / "baseline.safetensors"),
                             ProbeSet.load_dir(artifacts / "probes", fingerprint=FP), log_alarms=False)
        reference.update(in_topic)
        assert statistics(port) == pytest.approx({st.slot.name: st.value for st in reference.states}, rel=1e-6)
        assert alarms(port) == {st.slot.name: st.alarms_total for st in reference.states}
    finally:
        assert stop(proc)[0] == 0
        sink.close()


def test_an_answered_ingest_body_survives_a_kill(artifacts, tmp_path):
    # no periodic checkpoint within the test: only the one the answer waits for can keep the records
    ckpt = {"path": str(tmp_path / "ckpt"), "interval_seconds": 300}
    proc, port, _ = start(artifacts, tmp_path, checkpoint=ckpt, ingest=True)
    first = b"".join(encode(r) for r in stream(300, 0))
    code, answer = post(ingest_port(tmp_path), first, headers={"Idempotency-Key": "body-1"})
    assert (code, answer) == (200, {"accepted": 300, "corrupt": 0, "invalid": 0, "durable": True})
    proc.kill()  # right after the answer
    proc.communicate(timeout=10)
    proc, port, _ = start(artifacts, tmp_path, checkpoint=ckpt, ingest=True)
    try:
        assert received(port) == 300
        # a client whose answer was lost retries with the same key: answered again, not counted twice
        code, answer = post(ingest_port(tmp_path), first, headers={"Idempotency-Key": "body-1"})
        assert code == 200 and answer["duplicate"] is True and answer["accepted"] == 300
        assert received(port) == 300
        assert post(ingest_port(tmp_path), first, headers={"Idempotency-Key": "x" * 129})[0] == 400
        code, answer = post(ingest_port(tmp_path), b"".join(encode(r) for r in stream(200, 300)))
        assert code == 200 and answer["durable"] is True
        assert received(port) == 500
    finally:
        assert stop(proc)[0] == 0


def test_an_idempotency_key_is_analyzed_once_and_a_busy_key_gets_409(artifacts, tmp_path):
    settings = Settings(baseline=artifacts / "baseline.safetensors", probes=artifacts / "probes",
                        source={"kind": "none", "poll_seconds": 0.05},
                        checkpoint={"path": tmp_path / "ckpt", "interval_seconds": 300},
                        ingest={"idempotency_keys": 2})
    sc = Sidecar(settings)
    source = threading.Thread(target=sc.run_source, daemon=True)
    source.start()
    try:
        bodies = [b"".join(encode(r) for r in stream(40, 40 * i)) for i in range(3)]
        for i, body in enumerate(bodies):
            assert sc.ingest_body(body, key=f"k{i}") == (200, {"accepted": 40, "corrupt": 0, "invalid": 0,
                                                               "durable": True})
        assert sc.ingest_body(bodies[2], key="k2")[1]["duplicate"] is True
        assert sc.analyzer.stats.records_total == 120
        assert "duplicate" not in sc.ingest_body(bodies[0], key="k0")[1]  # forgotten: only the last 2 kept
        assert sc.analyzer.stats.records_total == 160
        sc._in_progress.add("busy")
        assert sc.ingest_body(bodies[1], key="busy")[0] == 409
    finally:
        sc.request_stop()
        source.join(10)


def test_a_closing_sidecar_refuses_ingest_bodies_before_analyzing_them(artifacts, tmp_path):
    settings = Settings(baseline=artifacts / "baseline.safetensors", probes=artifacts / "probes",
                        source={"kind": "none"}, checkpoint={"path": tmp_path / "ckpt", "interval_seconds": 300})
    sc = Sidecar(settings)
    body = b"".join(encode(r) for r in stream(50, 0))
    sc.close_ingest()
    code, answer = sc.ingest_body(body)
    assert code == 503 and answer["accepted"] == 0
    assert sc.analyzer.stats.records_total == 0
