"""``latentwatch serve``: the sidecar process.

It reads records from a source (tailing a file the tap's :class:`~collectors.sinks.FileSink` appends
to, a Kafka topic as a consumer-group member (:mod:`monitor.sidecar.kafka_source`), and/or ``POST /ingest``
with encoded records in the body), validates them, scores the probes,
updates the analyzer and serves:

* ``GET /metrics`` -- Prometheus exposition, values read from the analyzer at scrape time;
* ``GET /healthz`` -- 200 while the process runs;
* ``GET /readyz`` -- 200 once the baseline and probes are loaded and the source is readable, else 503;
* ``POST /ingest`` -- records back to back in the body (``latentwatch replay`` uses it).

SIGTERM or SIGINT stops it gracefully: the source is drained one last time, in-flight requests finish,
a final summary is logged, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from threadpoolctl import threadpool_limits

from collectors.record import Record
from collectors.sinks import FileReadStats, RecordStream
from monitor.analysis.analyzer import AlarmEvent, Analyzer
from monitor.analysis.baseline import Baseline
from monitor.probes.probe import ProbeSet
from monitor.sidecar.exporter import SCORE_BUCKETS, SidecarCollector
from monitor.sidecar.kafka_source import KafkaSource
from monitor.sidecar.settings import Settings

log = logging.getLogger("latentwatch.sidecar")
MAX_INGEST_BYTES = 64 << 20


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (``ts``, ``level``, ``logger``, ``msg``)."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class FileTail:
    """Follow a growing signature file; survives truncation or replacement (log rotation)."""

    def __init__(self, path: Path, from_start: bool = True) -> None:
        self.path = path
        self.stats = FileReadStats()
        self._stream = RecordStream(self.stats)
        self._pos = path.stat().st_size if (not from_start and path.exists()) else 0
        self._inode = path.stat().st_ino if path.exists() else None

    def readable(self) -> bool:
        return self.path.parent.exists()

    def poll(self, limit: int = 1 << 24) -> list[Record]:
        if not self.path.exists():
            return []
        st = self.path.stat()
        if st.st_ino != self._inode or st.st_size < self._pos:  # rotated or truncated: start over
            self._inode, self._pos, self._stream = st.st_ino, 0, RecordStream(self.stats)
        if st.st_size == self._pos:
            return []
        with self.path.open("rb") as f:
            f.seek(self._pos)
            data = f.read(limit)
        self._pos += len(data)
        return self._stream.feed(data)


class Sidecar:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.baseline = Baseline.load(settings.baseline)
        self.probes = (ProbeSet.load_dir(settings.probes, fingerprint=self.baseline.fingerprint)
                       if settings.probes else None)
        self.analyzer = Analyzer(self.baseline, self.probes)
        self.lock = threading.Lock()
        self.replicas: dict[str, dict[str, int]] = {}
        self.corrupt_total = 0
        self.last_record_ts = 0.0
        k = len(self.probes.concepts) if self.probes else 0
        self.score_buckets = np.zeros((k, len(SCORE_BUCKETS)), dtype=np.int64)
        self.score_sum = np.zeros(k)
        self._recent = np.zeros((self.baseline.config.window, k), dtype=bool)
        self._recent_n = 0
        self.tail = FileTail(settings.source.path, settings.source.from_start) if (
            settings.source.kind == "file" and settings.source.path) else None
        self.kafka = (KafkaSource(settings.source.kafka, self.baseline.fingerprint)
                      if settings.source.kind == "kafka" and settings.source.kafka else None)
        self.registry = CollectorRegistry()
        self.registry.register(SidecarCollector(self))
        self.stop = threading.Event()

    # ---------------------------------------------------------------- ingestion
    def ingest(self, records: list[Record], corrupt: int = 0) -> list[AlarmEvent]:
        """Analyze records (in batches); returns the alarms that fired."""
        fired: list[AlarmEvent] = []
        with self.lock:
            self.corrupt_total += corrupt
        for i in range(0, len(records), self.settings.batch_size):
            batch = records[i : i + self.settings.batch_size]
            with self.lock:  # per batch: a scrape waits for one batch at most
                before = self.analyzer.scored_total
                fired += self.analyzer.update(batch)
                if self.probes is not None and self.analyzer.scored_total > before:
                    self._account_scores(self.analyzer.last_scores)
                self._account_tap(batch)
        return fired

    def _account_scores(self, scores: np.ndarray) -> None:
        idx = np.searchsorted(SCORE_BUCKETS, scores, side="left")  # bucket le=b holds scores <= b
        for j in range(scores.shape[1]):
            self.score_buckets[j] += np.bincount(np.minimum(idx[:, j], len(SCORE_BUCKETS) - 1),
                                                 minlength=len(SCORE_BUCKETS))
        self.score_sum += scores.sum(axis=0)
        above = self.probes.above(scores)
        w = self._recent.shape[0]
        for row in above[-w:]:
            self._recent[self._recent_n % w] = row
            self._recent_n += 1

    def window_rates(self) -> dict[str, float]:
        if self.probes is None or not self._recent_n:
            return {}
        n = min(self._recent_n, self._recent.shape[0])
        rates = self._recent[:n].mean(axis=0)
        return {c: float(r) for c, r in zip(self.probes.concepts, rates, strict=True)}

    def _account_tap(self, batch: list[Record]) -> None:
        """Newest record time, and each replica's cumulative tap counters (from its newest record)."""
        fp = self.baseline.fingerprint
        newest: dict[str, Record] = {}
        for rec in batch:
            if rec.fingerprint == fp:
                newest[rec.meta.get("replica", "unknown")] = rec
        for replica, rec in newest.items():
            self.last_record_ts = max(self.last_record_ts, rec.ts)
            if replica not in self.replicas and len(self.replicas) >= self.settings.max_replicas:
                replica = "other"
            counters = self.replicas.setdefault(replica, {})
            for key, meta_key in (("sampled", "tap_sampled"), ("dropped", "tap_dropped"),
                                  ("sink_dropped", "sink_dropped")):
                with contextlib.suppress(ValueError):  # a malformed counter is ignored, not fatal
                    counters[key] = max(counters.get(key, 0), int(rec.meta.get(meta_key, "0")))

    def poll_once(self) -> int:
        if self.kafka is not None:
            return self.kafka.poll(self.ingest)  # waits up to poll_timeout_seconds for messages
        if self.tail is None:
            return 0
        corrupt_before = self.tail.stats.corrupt
        records = self.tail.poll()
        corrupt = self.tail.stats.corrupt - corrupt_before
        if records or corrupt:
            self.ingest(records, corrupt)
        return len(records)

    def run_source(self) -> None:
        while not self.stop.is_set():
            try:
                if self.poll_once() == 0 and self.kafka is None:
                    self.stop.wait(self.settings.source.poll_seconds)
            except Exception:
                log.exception("source poll failed; retrying")
                self.stop.wait(self.settings.source.poll_seconds)

    def ready(self) -> bool:
        if self.kafka is not None:
            return self.kafka.ready()
        return self.tail is None or self.tail.readable()

    def close_source(self) -> None:
        """Last read of a file source; commit and leave the group for Kafka."""
        if self.kafka is not None:
            self.kafka.close()
        else:
            self.poll_once()  # records written before the signal are still accounted

    def summary(self) -> dict[str, Any]:
        a = self.analyzer
        return {"records": a.stats.records_total, "invalid": dict(a.stats.invalid_total),
                "corrupt": self.corrupt_total, "evaluations": a.stats.evaluations_total,
                "alarms": {st.slot.name: st.alarms_total for st in a.states if st.alarms_total}}


def _handler(sidecar: Sidecar) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "latentwatch"

        def log_message(self, fmt: str, *args: Any) -> None:  # access logs at debug level only
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(sidecar.registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                ok = sidecar.ready()
                self._send(200 if ok else 503, b"ready\n" if ok else b"source not readable\n")
            else:
                self._send(404, b"not found\n")

        def do_POST(self) -> None:
            if self.path.split("?", 1)[0] != "/ingest":
                self._send(404, b"not found\n")
                return
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
            if not 0 <= length <= MAX_INGEST_BYTES:
                self._send(413, b"body must have a Content-Length of at most 64 MiB\n")
                return
            stream = RecordStream()
            records = stream.feed(self.rfile.read(length))
            corrupt = stream.stats.corrupt + (1 if stream.pending_bytes else 0)
            sidecar.ingest(records, corrupt)
            body = json.dumps({"accepted": len(records), "corrupt": corrupt}).encode()
            self._send(200, body, "application/json")

    return Handler


def start_http(sidecar: Sidecar) -> ThreadingHTTPServer:
    """Serve the sidecar's endpoints from a background thread; ``server.shutdown()`` stops it."""
    server = ThreadingHTTPServer((sidecar.settings.host, sidecar.settings.port), _handler(sidecar))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="latentwatch-http", daemon=True).start()
    return server


def serve(settings: Settings) -> int:
    """Run the sidecar until SIGTERM/SIGINT; returns the exit code."""
    threadpool_limits(settings.threads)  # process-wide: the analysis runs on small matrices
    sidecar = Sidecar(settings)
    server = start_http(sidecar)
    host, port = server.server_address[:2]
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sidecar.stop.set())
    source = threading.Thread(target=sidecar.run_source, name="latentwatch-source", daemon=True)
    source.start()
    log.info("serving model %s on http://%s:%s (baseline %s, %d detectors, probes: %s, pid %d)",
             sidecar.baseline.model, host, port, settings.baseline, len(sidecar.baseline.slots),
             ", ".join(sidecar.probes.concepts) if sidecar.probes else "none", os.getpid())
    started = time.monotonic()
    while not sidecar.stop.wait(1.0):
        pass
    log.info("shutting down: draining the source")
    source.join(timeout=10)
    try:
        sidecar.close_source()
    except Exception:
        log.exception("closing the source failed")
    server.shutdown()
    server.server_close()
    log.info("stopped after %.0f s: %s", time.monotonic() - started, json.dumps(sidecar.summary()))
    return 0
