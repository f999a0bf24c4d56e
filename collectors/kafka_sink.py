"""Kafka sink: the tap's records go to a Kafka topic; the tap never waits for the broker.

One message per record (the binary encoding of :mod:`collectors.record`, float16 arrays by default),
keyed ``<model>/<replica>`` so that one server replica's stream stays in one partition, in order, and
a model's replicas spread over the partitions (see docs/kafka.md for what that means for monitors).

Never blocking, never raising into the tap:

* the producer is created by a background thread that retries with backoff, so a broker that is down
  at start-up does not delay or crash the inference server; until it connects, records are dropped
  and counted (``dropped_unavailable``);
* records waiting for the broker are bounded by ``buffer_bytes``; beyond it they are dropped and
  counted (``dropped_buffer_full``); records the producer gives up on (broker down longer than
  ``delivery_timeout_ms``) are counted in ``dropped_delivery``;
* kafka-python reconnects by itself once connected; delivery resumes when the broker returns.

``dropped`` (all of them) travels in every record's ``sink_dropped`` metadata, so the monitor exports
transport drops per replica (``latentwatch_tap_dropped_total{stage="transport"}``).

Example (a broker on localhost)::

    from collectors import Tap
    from collectors.kafka_sink import KafkaConnection, KafkaSink

    sink = KafkaSink(KafkaConnection(bootstrap_servers="kafka:9092", topic="latentwatch.smollm2"))
    tap = Tap(model, sink=sink, sample_rate=0.1).attach()

The same code talks to Apache Kafka, Redpanda or a managed Kafka; TLS and SASL settings pass through
:class:`KafkaConnection`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from collectors.record import Record, encode

log = logging.getLogger(__name__)


class KafkaConnection(BaseModel):
    """Where the topic lives and how to authenticate (shared by the sink and the sidecar's source)."""

    model_config = ConfigDict(extra="forbid")
    bootstrap_servers: str = Field(..., description="host:port[,host:port...]")
    topic: str = Field("latentwatch.signatures", pattern=r"^[A-Za-z0-9._-]{1,249}$")
    client_id: str = "latentwatch"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER", "GSSAPI"] | None = None
    sasl_plain_username: str | None = None
    sasl_plain_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    options: dict[str, Any] = Field(default_factory=dict, description="passed to kafka-python as they are")

    def client_config(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's clients (secrets unwrapped here, never logged)."""
        out: dict[str, Any] = {"bootstrap_servers": self.bootstrap_servers.split(","), "client_id": self.client_id,
                               "security_protocol": self.security_protocol}
        for name in ("sasl_mechanism", "sasl_plain_username", "ssl_cafile", "ssl_certfile", "ssl_keyfile"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.sasl_plain_password is not None:
            out["sasl_plain_password"] = self.sasl_plain_password.get_secret_value()
        if self.security_protocol in ("SSL", "SASL_SSL"):
            out["ssl_check_hostname"] = self.ssl_check_hostname
        return {**out, **self.options}


def record_key(record: Record, key_by: str) -> bytes | None:
    """The message key: ``model/replica`` (default), ``model``, or none (spread evenly)."""
    if key_by == "none":
        return None
    if key_by == "model":
        return record.model.encode()
    return f"{record.model}/{record.meta.get('replica', '')}".encode()


def _check_codec(compression_type: str | None) -> None:
    """A missing codec is a deployment error: say so at construction, not as dropped records later."""
    if compression_type is None:
        return
    from kafka import codec

    available = {"gzip": codec.has_gzip, "snappy": codec.has_snappy, "lz4": codec.has_lz4, "zstd": codec.has_zstd}
    if compression_type not in available:
        raise ValueError(f"compression_type {compression_type!r}: expected one of {sorted(available)} or None")
    if not available[compression_type]():
        raise ValueError(f"compression_type {compression_type!r} needs its Python codec library "
                         "(lz4: pip install lz4, zstd: zstandard, snappy: python-snappy)")


class KafkaSink:
    """Asynchronous, bounded Kafka producer behind the tap's ``write``/``flush``/``close``.

    Args:
        connection: broker addresses, topic and security settings.
        key_by: ``"model_replica"`` (default), ``"model"`` or ``"none"`` -- see :func:`record_key`.
        compression_type: ``"lz4"`` (default), ``"zstd"``, ``"gzip"``, ``"snappy"`` or ``None``.
        buffer_bytes: encoded bytes allowed to wait for the broker; beyond it records are dropped.
        linger_ms, batch_size: producer batching (wait up to ``linger_ms`` to fill ``batch_size`` bytes).
        delivery_timeout_ms: how long a record may wait for a broker before it is dropped.
        half: store arrays as float16 on the wire (half the bytes; ~3 significant digits).
        flush_timeout_s: longest ``flush``/``close`` waits for outstanding records.
    """

    def __init__(self, connection: KafkaConnection, *,
                 key_by: Literal["model_replica", "model", "none"] = "model_replica",
                 compression_type: str | None = "lz4", buffer_bytes: int = 32 << 20, linger_ms: int = 20,
                 batch_size: int = 256 << 10, delivery_timeout_ms: int = 30_000, half: bool = True,
                 flush_timeout_s: float = 10.0, acks: int | str = 1) -> None:
        _check_codec(compression_type)
        self.connection = connection
        self.topic = connection.topic
        self.key_by = key_by
        self.buffer_bytes = buffer_bytes
        self.half = half
        self.flush_timeout_s = flush_timeout_s
        self._config = {**connection.client_config(), "compression_type": compression_type, "linger_ms": linger_ms,
                        "batch_size": batch_size, "acks": acks, "max_block_ms": 2_000,
                        # idempotence off: a producer id does not survive a broker that lost its state, and
                        # a rare duplicate after a retry is harmless to window statistics
                        "enable_idempotence": False,
                        "request_timeout_ms": min(10_000, delivery_timeout_ms - linger_ms - 1),
                        "delivery_timeout_ms": delivery_timeout_ms, "retries": 2**31 - 1,
                        "max_request_size": 16 << 20}
        self._producer: Any = None
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.connected = threading.Event()
        self.buffered_bytes = 0
        self.written = 0
        self.acked = 0
        self.dropped_unavailable = 0
        self.dropped_buffer_full = 0
        self.dropped_send_error = 0
        self.dropped_delivery = 0
        self.last_error = ""
        self._last_log = 0.0
        self._connector = threading.Thread(target=self._connect, name="latentwatch-kafka-connect", daemon=True)
        self._connector.start()

    @property
    def dropped(self) -> int:
        return self.dropped_unavailable + self.dropped_buffer_full + self.dropped_send_error + self.dropped_delivery

    def _note(self, what: str, exc: BaseException | None = None) -> None:
        self.last_error = f"{what}: {exc}" if exc else what
        now = time.monotonic()
        if now - self._last_log > 10:  # at most one warning per 10 s; the counters carry the rest
            self._last_log = now
            log.warning("latentwatch kafka sink (%s, topic %s): %s; dropped so far %d",
                        self.connection.bootstrap_servers, self.topic, self.last_error, self.dropped)

    def _connect(self) -> None:
        from kafka import KafkaProducer  # optional dependency: pip install latentwatch[kafka]

        delay = 0.5
        while not self._closed.is_set():
            producer = None
            try:
                producer = KafkaProducer(**self._config)
                producer.partitions_for(self.topic)  # topic metadata, so send() never waits for it
                if self._closed.is_set():  # closed while connecting
                    producer.close(timeout=0)
                    return
                self._producer = producer
                self.connected.set()
                log.info("latentwatch kafka sink connected to %s, topic %s", self.connection.bootstrap_servers,
                         self.topic)
                return
            except Exception as exc:  # broker down, bad address, auth failure: retry, never raise
                self._note("cannot connect", exc)
                if producer is not None:
                    producer.close(timeout=0)
            self._closed.wait(delay)
            delay = min(delay * 2, 30.0)

    def write(self, record: Record) -> None:
        producer = self._producer
        if producer is None:
            self.dropped_unavailable += 1
            self._note("broker not connected yet")
            return
        data = encode(record, half=self.half)
        size = len(data)
        with self._lock:
            if self.buffered_bytes + size > self.buffer_bytes:
                self.dropped_buffer_full += 1
                full = True
            else:
                self.buffered_bytes += size
                full = False
        if full:
            self._note(f"buffer full ({self.buffer_bytes} bytes waiting for the broker)")
            return
        try:
            future = producer.send(self.topic, value=data, key=record_key(record, self.key_by))
        except Exception as exc:
            self._release(size)
            self.dropped_send_error += 1
            self._note("send failed", exc)
            return
        self.written += 1
        future.add_callback(self._on_ack, size)
        future.add_errback(self._on_error, size)

    def _release(self, size: int) -> None:
        with self._lock:
            self.buffered_bytes -= size

    def _on_ack(self, size: int, _metadata: object) -> None:
        self._release(size)
        self.acked += 1

    def _on_error(self, size: int, exc: BaseException) -> None:
        self._release(size)
        self.dropped_delivery += 1
        self._note("delivery failed", exc)

    def flush(self) -> None:
        """Wait (up to ``flush_timeout_s``) for outstanding records; never raises on a broker outage."""
        producer = self._producer
        if producer is None:
            return
        try:
            producer.flush(timeout=self.flush_timeout_s)
        except Exception as exc:
            self._note("flush timed out", exc)

    def close(self) -> None:
        self._closed.set()
        producer = self._producer
        if producer is not None:
            self.flush()
            producer.close(timeout=self.flush_timeout_s)
        self._connector.join(timeout=5)

    def stats(self) -> dict[str, int]:
        return {"written": self.written, "acked": self.acked, "dropped": self.dropped,
                "dropped_unavailable": self.dropped_unavailable, "dropped_buffer_full": self.dropped_buffer_full,
                "dropped_send_error": self.dropped_send_error, "dropped_delivery": self.dropped_delivery,
                "buffered_bytes": self.buffered_bytes}
