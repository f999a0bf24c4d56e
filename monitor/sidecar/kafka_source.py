"""Kafka source of the sidecar: a consumer group member that feeds the analyzer, at least once.

Delivery: offsets are committed only for records the analyzer has accounted (analyzed, or counted
as invalid), every ``commit_interval_seconds``, on a rebalance (before partitions are handed over)
and on shutdown. A monitor that crashes re-reads what it had not committed (at-least-once); a
restarted monitor resumes from the group's committed offsets.

Bad messages: bytes that are not a record are counted (``latentwatch_records_invalid_total
{reason="corrupt"}``), records of another model are counted under ``reason="fingerprint"``; both are
skipped, never fatal, and copied to ``dead_letter_topic`` when one is configured (headers
``latentwatch_reason`` and ``latentwatch_origin`` = ``topic/partition/offset``).

Several monitors in one group split the topic's partitions. What that means for drift state is in
docs/kafka.md: each monitor's windows hold the records of the partitions it owns; a rebalance keeps
the windows (the records in them are still samples of the same model's traffic) and the new owner of
a partition continues from the committed offset.

Consumer lag is the fetch high watermark minus the next offset to process, per partition; it is not
computed from ``end_offsets()`` (some Kafka-protocol brokers under-report it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from pydantic import Field

from collectors.kafka_sink import KafkaConnection
from collectors.record import Record, RecordError, decode

log = logging.getLogger("latentwatch.kafka")


class KafkaSourceConfig(KafkaConnection):
    """The connection plus consumer-group settings (``source.kafka`` in the sidecar's YAML)."""

    group_id: str = Field("latentwatch-monitor", min_length=1, max_length=255)
    dead_letter_topic: str | None = Field(None, pattern=r"^[A-Za-z0-9._-]{1,249}$")
    auto_offset_reset: Literal["earliest", "latest"] = "earliest"
    # a poll that drains what was fetched lets kafka-python send the next fetch before the batch is
    # analyzed (pipelining): keep max_poll_records above partitions x max_partition_fetch_bytes / ~7.7 KB
    max_poll_records: int = Field(5000, ge=1, le=100_000)
    max_partition_fetch_bytes: int = Field(2 << 20, ge=1 << 16, le=1 << 30)
    poll_timeout_seconds: float = Field(0.5, gt=0, le=30)
    commit_interval_seconds: float = Field(1.0, gt=0, le=300)
    session_timeout_ms: int = Field(10_000, ge=1_000, le=300_000)
    heartbeat_interval_ms: int = Field(3_000, ge=100, le=100_000)
    reconnect_seconds: float = Field(2.0, gt=0, le=300)


def _listener(source: KafkaSource) -> Any:
    from kafka import ConsumerRebalanceListener

    class Listener(_Listener, ConsumerRebalanceListener):
        pass

    return Listener(source)


class _Listener:
    """Commit what was accounted before partitions go; note what arrives."""

    def __init__(self, source: KafkaSource) -> None:
        self.source = source

    def on_partitions_revoked(self, revoked: Any) -> None:
        self.source._commit([tp for tp in revoked if tp in self.source._next], reason="rebalance")
        for tp in revoked:
            self.source._next.pop(tp, None)

    def on_partitions_assigned(self, assigned: Any) -> None:
        src = self.source
        with src._lock:
            src.rebalances += 1
            src.assigned = sorted(tp.partition for tp in assigned)
        log.info("assigned partitions %s of %s (group %s)", src.assigned, src.config.topic, src.config.group_id)
        for tp in assigned:  # a restarted monitor continues where its checkpointed windows end
            offset = src._resume.pop(tp.partition, None)
            if offset is not None and src._consumer is not None:
                src._consumer.seek(tp, offset)
                log.info("partition %d: resuming at checkpointed offset %d", tp.partition, offset)


class KafkaSource:
    """Consume records for one model (``fingerprint``) from ``config.topic`` as a member of a group."""

    def __init__(self, config: KafkaSourceConfig, fingerprint: str, resume: dict[str, int] | None = None) -> None:
        self.config = config
        # partition -> offset after the last record in a restored checkpoint (sought once, at assignment)
        self._resume: dict[int, int] = {int(p): int(o) for p, o in (resume or {}).items()}
        self.fingerprint = fingerprint
        self._consumer: Any = None
        self._dead_letters: Any = None
        self._next: dict[Any, int] = {}  # partition -> next offset to commit (everything before is accounted)
        self._committed: dict[int, int] = {}
        self._last_commit = time.monotonic()
        self._next_connect = 0.0
        self._last_connection_check = 0.0
        self._lock = threading.Lock()  # guards what the exporter reads
        self.connected = False
        self.assigned: list[int] = []
        self.consumed: Counter[int] = Counter()
        self.lag: dict[int, int] = {}
        self.rebalances = 0
        self.commits = 0
        self.commit_failures = 0
        self.dead_lettered: Counter[str] = Counter()
        self.dead_letter_failures = 0

    # ------------------------------------------------------------------ connection
    def _connect(self) -> bool:
        if self._consumer is not None:
            return True
        if time.monotonic() < self._next_connect:
            return False
        from kafka import KafkaConsumer  # optional dependency: pip install latentwatch[kafka]

        c = self.config
        consumer = None
        try:
            consumer = KafkaConsumer(**c.client_config(), group_id=c.group_id, enable_auto_commit=False,
                                     auto_offset_reset=c.auto_offset_reset, max_poll_records=c.max_poll_records,
                                     max_partition_fetch_bytes=c.max_partition_fetch_bytes,
                                     session_timeout_ms=c.session_timeout_ms,
                                     heartbeat_interval_ms=c.heartbeat_interval_ms)
            consumer.subscribe([c.topic], listener=_listener(self))
        except Exception as exc:  # broker unreachable, bad credentials: retry later, keep serving /metrics
            if consumer is not None:
                consumer.close(autocommit=False, timeout_ms=1_000)
            self._next_connect = time.monotonic() + c.reconnect_seconds
            log.warning("cannot connect to Kafka at %s (%s); retrying in %.0f s", c.bootstrap_servers, exc,
                        c.reconnect_seconds)
            return False
        self._consumer = consumer
        log.info("consuming %s from %s as group %s", c.topic, c.bootstrap_servers, c.group_id)
        return True

    def ready(self) -> bool:
        return self.connected

    # ------------------------------------------------------------------ consuming
    def poll(self, ingest: Callable[[list[Record], int], object]) -> int:
        """Fetch one batch, hand it to ``ingest(records, corrupt)``, then mark it accounted.

        Returns the number of messages consumed. ``ingest`` runs before any offset moves, so an
        exception in it leaves the batch uncommitted; the consumer seeks back and reads it again.
        """
        if not self._connect():
            return 0
        consumer = self._consumer
        c = self.config
        try:
            batches = consumer.poll(timeout_ms=int(c.poll_timeout_seconds * 1000), max_records=c.max_poll_records)
        except Exception as exc:
            self.connected = False
            log.warning("Kafka poll failed: %s", exc)
            time.sleep(min(1.0, c.reconnect_seconds))
            return 0
        self._check_connection()
        records: list[Record] = []
        bad: list[tuple[Any, str]] = []
        for msgs in batches.values():
            for m in msgs:
                try:
                    rec = decode(m.value if m.value is not None else b"")
                except RecordError:
                    bad.append((m, "corrupt"))
                    continue
                if rec.fingerprint != self.fingerprint:
                    bad.append((m, "foreign_model"))  # still ingested: the analyzer counts it as "fingerprint"
                records.append(rec)
        n = sum(len(msgs) for msgs in batches.values())
        corrupt = sum(1 for _, reason in bad if reason == "corrupt")
        if records or corrupt:
            try:
                ingest(records, corrupt)
            except Exception:
                for tp, msgs in batches.items():  # read the batch again rather than commit past it
                    consumer.seek(tp, msgs[0].offset)
                raise
        if bad and c.dead_letter_topic:
            self._dead_letter(bad)
        with self._lock:
            for tp, msgs in batches.items():
                if msgs:
                    self._next[tp] = msgs[-1].offset + 1
                    self.consumed[tp.partition] += len(msgs)
        self._update_lag()
        if time.monotonic() - self._last_commit >= c.commit_interval_seconds:
            self._commit(list(self._next), reason="interval")
        return n

    def positions(self) -> dict[str, int]:
        """Partition -> next offset to process: everything before it is accounted (for checkpoints)."""
        with self._lock:
            out = {str(tp.partition): off for tp, off in self._next.items()}
        out.update({str(p): o for p, o in self._resume.items() if str(p) not in out})  # not yet reassigned
        return out

    def _check_connection(self) -> None:
        """``connected``: the client holds at least one broker connection (checked once a second; a poll
        against a dead broker returns nothing rather than failing)."""
        now = time.monotonic()
        if now - self._last_connection_check < 1.0:
            return
        self._last_connection_check = now
        try:
            count = self._consumer.metrics().get("consumer-metrics", {}).get("connection-count", 1.0)
        except Exception:
            count = 1.0  # metrics unavailable: assume connected rather than raise a false alert
        self.connected = count > 0

    def _dead_letter(self, bad: list[tuple[Any, str]]) -> None:
        try:
            if self._dead_letters is None:
                from kafka import KafkaProducer

                self._dead_letters = KafkaProducer(**self.config.client_config(), max_block_ms=5_000)
            for m, reason in bad:
                origin = f"{m.topic}/{m.partition}/{m.offset}".encode()
                self._dead_letters.send(self.config.dead_letter_topic, value=m.value or b"", key=m.key,
                                        headers=[("latentwatch_reason", reason.encode()),
                                                 ("latentwatch_origin", origin)])
                self.dead_lettered[reason] += 1
        except Exception as exc:  # the originals stay counted; a dead-letter outage is not fatal
            self.dead_letter_failures += 1
            log.warning("copying %d messages to dead-letter topic %s failed: %s", len(bad),
                        self.config.dead_letter_topic, exc)

    def _update_lag(self) -> None:
        consumer = self._consumer
        lag = {}
        for tp in consumer.assignment():
            hw = consumer.highwater(tp)
            nxt = self._next.get(tp)
            if nxt is None:
                try:
                    nxt = consumer.position(tp, timeout_ms=200)
                except Exception:
                    nxt = None
            if hw is not None and nxt is not None:
                lag[tp.partition] = max(0, hw - nxt)
        with self._lock:
            self.lag = lag

    def _commit(self, tps: list[Any], reason: str) -> None:
        self._last_commit = time.monotonic()
        if not tps or self._consumer is None:
            return
        from kafka.structs import OffsetAndMetadata

        if self._dead_letters is not None:
            self._dead_letters.flush(timeout=10)  # dead-letter copies land before offsets move past them
        offsets = {tp: OffsetAndMetadata(self._next[tp], "", -1) for tp in tps
                   if self._committed.get(tp.partition) != self._next[tp]}
        if not offsets:
            return
        try:
            self._consumer.commit(offsets)
        except Exception as exc:  # retried at the next commit; records may be re-read after a crash
            with self._lock:
                self.commit_failures += 1
            log.warning("offset commit (%s) failed: %s", reason, exc)
            return
        with self._lock:
            self.commits += 1
            for tp, om in offsets.items():
                self._committed[tp.partition] = om.offset

    def close(self) -> None:
        """Commit what was accounted and leave the group (its partitions move to the others at once)."""
        if self._consumer is not None:
            self._commit(list(self._next), reason="shutdown")
            self._consumer.close(autocommit=False, timeout_ms=5_000)
            self._consumer = None
        if self._dead_letters is not None:
            self._dead_letters.close(timeout=5)
            self._dead_letters = None

    # ------------------------------------------------------------------ metrics
    def collect(self, model: str) -> Iterator:
        """Metric families of the consumer (read at scrape time by the sidecar's collector)."""
        topic = self.config.topic
        labels = ["model_name", "topic", "partition"]
        with self._lock:
            lag = GaugeMetricFamily("latentwatch_kafka_consumer_lag",
                                    "Records behind the fetch high watermark, per partition", labels=labels)
            for p, v in sorted(self.lag.items()):
                lag.add_metric([model, topic, str(p)], v)
            consumed = CounterMetricFamily("latentwatch_kafka_records_consumed",
                                           "Messages consumed from Kafka, per partition", labels=labels)
            for p, v in sorted(self.consumed.items()):
                consumed.add_metric([model, topic, str(p)], v)
            committed = GaugeMetricFamily("latentwatch_kafka_committed_offset",
                                          "Last offset committed by this monitor, per partition", labels=labels)
            for p, v in sorted(self._committed.items()):
                committed.add_metric([model, topic, str(p)], v)
            assigned = GaugeMetricFamily("latentwatch_kafka_assigned_partitions",
                                         "Partitions this monitor owns", labels=["model_name", "topic"])
            assigned.add_metric([model, topic], len(self.assigned))
            up = GaugeMetricFamily("latentwatch_kafka_connected", "1 while the last poll reached the broker",
                                   labels=["model_name", "topic"])
            up.add_metric([model, topic], float(self.connected))
            counters = [("rebalances", "Partition assignments received", self.rebalances),
                        ("commits", "Offset commits", self.commits),
                        ("commit_failures", "Offset commits that failed", self.commit_failures),
                        ("dead_letter_failures", "Dead-letter copies that failed", self.dead_letter_failures)]
            simple = []
            for name, help_, value in counters:
                fam = CounterMetricFamily(f"latentwatch_kafka_{name}", help_, labels=["model_name", "topic"])
                fam.add_metric([model, topic], value)
                simple.append(fam)
            dead = CounterMetricFamily("latentwatch_kafka_dead_letter", "Messages copied to the dead-letter topic",
                                       labels=["model_name", "topic", "reason"])
            for reason in ("corrupt", "foreign_model"):
                dead.add_metric([model, topic, reason], self.dead_lettered.get(reason, 0))
        yield from (lag, consumed, committed, assigned, up, *simple, dead)
