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

import hashlib
import json
import logging
import os
import platform
import signal
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Info, PlatformCollector, ProcessCollector
from threadpoolctl import threadpool_limits

from collectors.record import PREFIX, Record, RecordError, decode, frame_length
from monitor import version
from monitor.analysis.analyzer import AlarmEvent, Analyzer
from monitor.analysis.baseline import VERSION as BASELINE_VERSION
from monitor.analysis.baseline import Baseline
from monitor.audit.trail import AuditError, AuditTrail
from monitor.probes.probe import ProbeSet
from monitor.sidecar import checkpoint
from monitor.sidecar.exporter import SCORE_BUCKETS, SidecarCollector
from monitor.sidecar.file_source import FileTail
from monitor.sidecar.http import HttpServers, describe
from monitor.sidecar.kafka_source import KafkaSource
from monitor.sidecar.settings import ConfigError, Settings

log = logging.getLogger("latentwatch.sidecar")


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (``ts``, ``level``, ``logger``, ``msg``); an exception travels as fields
    (``exc_type``, ``exc``: the traceback as one string), never as extra lines."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                               "logger": record.name, "msg": record.getMessage()}
        if record.exc_info and record.exc_info[0] is not None:
            out["exc_type"] = record.exc_info[0].__name__
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str)


def install_excepthooks() -> None:
    """Uncaught exceptions (main thread or any other) go through logging, so JSON logs stay one object a line."""
    import sys

    crash = logging.getLogger("latentwatch.crash")

    def main_hook(exc_type: type[BaseException], exc: BaseException, tb: Any) -> None:
        crash.critical("uncaught exception", exc_info=(exc_type, exc, tb))

    def thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        crash.error("uncaught exception in thread %s", name,
                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))

    sys.excepthook = main_hook
    threading.excepthook = thread_hook


def baseline_checksum(path: Path) -> str:
    """The SHA-256 a baseline file carries (verified by ``Baseline.load``): identifies the baseline."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return str((f.metadata() or {}).get("sha256", ""))


class Sidecar:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.baseline = Baseline.load(settings.baseline)
        self.baseline_sha256 = baseline_checksum(settings.baseline)
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
        self.restored = False  # state and position came from a checkpoint
        self._last_checkpoint = time.monotonic()
        self._alarm_pending = False  # an alarm fired since the last checkpoint: write one at once
        # ``/ingest`` answers a body once a checkpoint covers it (group commit by the source thread)
        self._ingest_seq = 0  # bodies analyzed
        self._durable_seq = 0  # bodies covered by the last written checkpoint
        self._ingesting = 0  # bodies past the closing check and not yet analyzed
        self._body_gate = threading.Lock()  # held while a body is analyzed and while a checkpoint is taken
        self._answered: OrderedDict[str, tuple[int, int, int]] = OrderedDict()  # key -> (seq, accepted, invalid)
        self._in_progress: set[str] = set()
        self._closing = False  # shutting down: new bodies are refused (503), not analyzed
        self._durable = threading.Condition()
        self._wake = threading.Event()  # set by a waiting ingest body: the source thread writes a checkpoint
        self._checkpoint_failed_at: float | None = None
        position = self._restore() if settings.checkpoint.path else None
        self.tail = FileTail(settings.source.path, settings.source.from_start,
                             position=(position or {}).get("file")) if (
            settings.source.kind == "file" and settings.source.path) else None
        self.kafka = (KafkaSource(settings.source.kafka, self.baseline.fingerprint,
                                  resume=(position or {}).get("kafka"))
                      if settings.source.kind == "kafka" and settings.source.kafka else None)
        self.audit_errors = 0  # batches the audit trail could not record
        self.audit = self._open_audit() if settings.audit.enabled else None
        window = self.baseline.config.window
        self._audit_seq_of = np.full(window, -1, dtype=np.int64)  # valid-record ordinal % window -> audit seq
        self._audit_first_ordinal = self.analyzer.valid_seen + 1  # the first one this writer audits
        self.registry = CollectorRegistry()
        self.registry.register(SidecarCollector(self))
        # the process itself (CPU, memory, open files, start time) and what is running
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        Info("latentwatch_build", "latentwatch version, Python version and baseline format of this sidecar",
             registry=self.registry).info({"version": version(), "python": platform.python_version(),
                                           "baseline_format": str(BASELINE_VERSION)})
        self.stop = threading.Event()

    # ---------------------------------------------------------------- checkpoints
    def _restore(self) -> dict[str, Any] | None:
        loaded = checkpoint.load(self.settings.checkpoint.path, self.baseline_sha256)
        if loaded is None:
            return None
        meta, arrays = loaded
        try:
            self.analyzer.load_state_dict(meta["analyzer"], {k.split("/", 1)[1]: v for k, v in arrays.items()
                                                             if k.startswith("analyzer/")})
            sc = meta["sidecar"]
            self.replicas = {r: {k: int(v) for k, v in c.items()} for r, c in sc["replicas"].items()}
            self.corrupt_total = int(sc["corrupt_total"])
            self.last_record_ts = float(sc["last_record_ts"])
            self._recent_n = int(sc["recent_n"])
            if self.probes is not None:
                self.score_buckets = np.array(arrays["sidecar/score_buckets"], dtype=np.int64)
                self.score_sum = np.array(arrays["sidecar/score_sum"], dtype=np.float64)
                self._recent = np.array(arrays["sidecar/recent"], dtype=bool)
            self._answered = OrderedDict((str(k), (0, int(a), int(i))) for k, a, i in sc.get("ingest_keys", []))
        except (KeyError, ValueError, TypeError) as exc:
            log.warning("checkpoint %s does not fit (%s); starting with empty windows", self.settings.checkpoint.path,
                        exc)
            self.analyzer = Analyzer(self.baseline, self.probes)
            return None
        self.restored = True
        log.info("restored drift state from %s: %d records, %d evaluations, alarms active: %s",
                 self.settings.checkpoint.path, self.analyzer.stats.records_total,
                 self.analyzer.stats.evaluations_total,
                 ", ".join(st.slot.name for st in self.analyzer.states if st.alarm) or "none")
        return meta.get("source") or {}

    def checkpoint(self) -> None:
        """Write the state and the source position (from the source thread, between batches)."""
        path = self.settings.checkpoint.path
        if path is None:
            return
        with self._body_gate, self.lock:
            if self.audit is not None:  # what the state (and an ingest answer) covers is in the trail on disk
                try:
                    self.audit.checkpoint()
                except (OSError, AuditError, ValueError) as exc:
                    self.audit_errors += 1
                    log.warning("audit trail: cannot checkpoint (%s)", exc)
            pending, self._alarm_pending = self._alarm_pending, False
            covered = self._ingest_seq
            ameta, aarrays = self.analyzer.state_dict()
            arrays = {f"analyzer/{k}": np.array(v) for k, v in aarrays.items()}
            arrays["sidecar/score_buckets"] = self.score_buckets.copy()
            arrays["sidecar/score_sum"] = self.score_sum.copy()
            arrays["sidecar/recent"] = self._recent.astype(np.uint8)
            meta = {"analyzer": ameta,
                    "sidecar": {"replicas": self.replicas, "corrupt_total": self.corrupt_total,
                                "last_record_ts": self.last_record_ts, "recent_n": self._recent_n,
                                "ingest_keys": [[k, a, i] for k, (_, a, i) in self._answered.items()]},
                    "source": {"file": self.tail.position() if self.tail is not None else None,
                               "kafka": self.kafka.positions() if self.kafka is not None else None}}
            meta = json.loads(json.dumps(meta))  # a copy, taken under the lock
        try:
            checkpoint.save(path, self.baseline_sha256, meta, arrays)
        except OSError as exc:
            log.warning("cannot write checkpoint %s: %s", path, exc)
            with self.lock:
                self._alarm_pending = self._alarm_pending or pending  # an alarm's state still needs a checkpoint
            self._checkpoint_failed_at = time.monotonic()
        else:
            self._checkpoint_failed_at = None
            with self._durable:
                self._durable_seq = max(self._durable_seq, covered)
                self._durable.notify_all()
        self._last_checkpoint = time.monotonic()

    # ---------------------------------------------------------------- audit trail
    def _open_audit(self) -> AuditTrail:
        cfg = self.settings.audit
        probes = (hashlib.sha256("".join(p.to_dict()["sha256"] for p in self.probes.probes).encode()).hexdigest()
                  if self.probes else None)
        self._probes_sha256 = probes
        try:
            return AuditTrail(cfg.dir, cfg.key(), start={
                "model": self.baseline.model, "fingerprint": self.baseline.fingerprint,
                "baseline_sha256": self.baseline_sha256, "probes_sha256": probes, "version": version(),
                "concepts": self.probes.concepts if self.probes else [],
                "thresholds": [float(t) for t in self.probes.thresholds] if self.probes else [],
                "restored_from_checkpoint": self.restored, "include_text": cfg.include_text},
                segment_bytes=cfg.segment_bytes, segment_seconds=cfg.segment_seconds,
                retention_seconds=cfg.retention_days * 86400.0, checkpoint_seconds=cfg.checkpoint_seconds)
        except (AuditError, OSError) as exc:
            raise ConfigError(f"audit.dir {cfg.dir}: {exc}") from exc

    def _audit_batch(self, batch: list[Record], first_ordinal: int, events: list[AlarmEvent]) -> None:
        """One ``record`` entry per record of the batch, then one ``alarm`` entry per alarm it fired (under
        the lock, right after the batch was analyzed)."""
        a, trail = self.analyzer, self.audit
        assert trail is not None
        concepts = self.probes.concepts if self.probes else []
        scores = above = None
        if a.last_scores is not None and self.probes is not None:  # once per batch, not per record
            above = [[c for c, hit in zip(concepts, row, strict=True) if hit]
                     for row in self.probes.above(a.last_scores).tolist()]
            rounded = a.last_scores.astype(np.float64).round(4).tolist()
            scores = [dict(zip(concepts, row, strict=True)) for row in rounded]
        active = [st.slot.name for st in a.states if st.alarm]
        baseline, probes = self.baseline_sha256[:16], (self._probes_sha256 or "")[:16] or None
        w = len(self._audit_seq_of)
        pending = sorted(events, key=lambda ev: ev.at_record)
        ordinal, row = first_ordinal, 0
        for rec, outcome in zip(batch, a.last_outcomes, strict=True):
            entry: dict[str, Any] = {"key": rec.key, "request_ts": rec.ts, "replica": rec.meta.get("replica"),
                                     "fingerprint": rec.fingerprint, "baseline": baseline, "probes": probes}
            if outcome is not None:
                entry["invalid"] = outcome
            else:
                if scores is not None and above is not None:
                    entry["scores"], entry["above"] = scores[row], above[row]
                row += 1
                entry["ordinal"] = ordinal
            entry["alarms"] = active
            if self.settings.audit.include_text and rec.text is not None:
                entry["text"] = rec.text
            written = trail.append("record", **entry)
            if outcome is None:
                self._audit_seq_of[ordinal % w] = written["seq"]
                while pending and pending[0].at_record == ordinal:  # right after the record it fired on
                    self._audit_alarm(pending.pop(0))
                ordinal += 1
        for ev in pending:  # not expected: an alarm on a record not in this batch
            self._audit_alarm(ev)
        trail.maybe_checkpoint()

    def _audit_alarm(self, ev: AlarmEvent) -> None:
        assert self.audit is not None
        w = len(self._audit_seq_of)
        first = ev.at_record - w + 1
        known = first >= self._audit_first_ordinal
        self.audit.append("alarm", detector=ev.detector, statistic=ev.statistic, threshold=ev.threshold,
                          at_ordinal=ev.at_record, window=w,
                          attribution=[[name, round(float(v), 6)] for name, v in ev.attribution],
                          exemplars=list(ev.exemplars),
                          records_from_seq=int(self._audit_seq_of[first % w]) if known else None,
                          records_to_seq=int(self._audit_seq_of[ev.at_record % w]),
                          note=None if known else "the window began before this writer started (a restart)")

    def close_audit(self) -> None:
        if self.audit is not None:
            with self.lock:
                self.audit.close()

    # ---------------------------------------------------------------- ingestion
    def ingest(self, records: list[Record], corrupt: int = 0, counts: dict[str, int] | None = None
               ) -> list[AlarmEvent]:
        """Analyze records (in batches); returns the alarms that fired. ``counts["invalid"]`` (when given)
        receives how many of them the analyzer refused."""
        fired: list[AlarmEvent] = []
        with self.lock:
            self.corrupt_total += corrupt
        for i in range(0, len(records), self.settings.batch_size):
            batch = records[i : i + self.settings.batch_size]
            with self.lock:  # per batch: a scrape waits for one batch at most
                before = self.analyzer.scored_total
                invalid_before = sum(self.analyzer.stats.invalid_total.values())
                first_ordinal = self.analyzer.valid_seen + 1
                events = self.analyzer.update(batch)
                fired += events
                if self.audit is not None:
                    try:
                        self._audit_batch(batch, first_ordinal, events)
                    except (OSError, AuditError, ValueError) as exc:  # a full volume must not stop the analysis
                        self.audit_errors += 1
                        log.warning("audit trail: cannot write (%s); records are analyzed, not audited", exc)
                if events:  # an alarm's state is checkpointed at once, so a crash does not fire it twice
                    self._alarm_pending = True
                if counts is not None:
                    counts["invalid"] = (counts.get("invalid", 0)
                                         + sum(self.analyzer.stats.invalid_total.values()) - invalid_before)
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
        """Newest record time, and each replica's tap counters from its records' metadata.

        The counters are cumulative in the tap; a value lower than the last one seen means the tap
        restarted (its counter began again at 0): the new value is added, not compared with an old maximum,
        so drops after a restart show at once. A record timestamp in the future counts as its receive time
        (a skewed clock must not pin the lag at zero). Replicas not heard from for ``replica_ttl_seconds``
        are dropped from the export."""
        fp = self.baseline.fingerprint
        now = time.time()
        for rec in batch:
            if rec.fingerprint != fp:
                continue
            self.last_record_ts = max(self.last_record_ts, min(rec.ts, now))
            replica = rec.meta.get("replica", "unknown")
            if replica not in self.replicas and len(self.replicas) >= self.settings.max_replicas:
                replica = "other"
            counters = self.replicas.setdefault(replica, {})
            counters["seen_at"] = int(now)
            for key, meta_key in (("sampled", "tap_sampled"), ("dropped", "tap_dropped"),
                                  ("sink_dropped", "sink_dropped")):
                try:
                    value = int(rec.meta.get(meta_key, "0"))
                except ValueError:  # a malformed counter is ignored, not fatal
                    continue
                if value < 0:
                    continue
                last = counters.get(f"{key}_last", 0)
                counters[key] = counters.get(key, 0) + (value - last if value >= last else value)
                counters[f"{key}_last"] = value
        ttl = self.settings.replica_ttl_seconds
        for replica in [r for r, c in self.replicas.items() if now - c.get("seen_at", now) > ttl]:
            del self.replicas[replica]

    def ingest_body(self, data: bytes, key: str | None = None) -> tuple[int, dict[str, Any]]:
        """``POST /ingest``: records back to back. All or nothing: a body with a malformed record (400) or a
        record of another model (422) is refused whole, with the reason; otherwise every record is analyzed
        (those the analyzer refuses -- wrong sites or dims, non-finite or implausible values -- are counted
        by reason). Returns (HTTP status, JSON answer).

        With a checkpoint configured, the answer waits until a checkpoint covers the body (the source thread
        writes one at once for all waiting bodies), so a 200 survives a ``kill -9``: nothing answered is lost,
        and nothing is counted twice when a client retries a body that got no answer. ``"durable": false``
        says no checkpoint could be written within ``ingest.ack_timeout_seconds`` (the records are analyzed,
        but a crash before the next checkpoint would lose them). While shutting down, bodies are refused
        with 503 before anything is analyzed.

        ``key`` (the ``Idempotency-Key`` header) names the body: a body whose key was already answered (in
        this run or, through the checkpoint, an earlier one) is answered again, ``"duplicate": true``,
        without being analyzed twice, so a client that retries until it gets an answer counts each record
        exactly once; a key whose body is still being analyzed gets 409. The last
        ``ingest.idempotency_keys`` keys are remembered."""
        records: list[Record] = []
        pos, view = 0, memoryview(data)
        fp = self.baseline.fingerprint
        try:
            while pos < len(data):
                total = frame_length(bytes(view[pos : pos + PREFIX.size]))
                if pos + total > len(data):
                    raise RecordError(f"record announces {total} bytes, the body has {len(data) - pos} left")
                records.append(decode(view[pos : pos + total]))
                pos += total
                if len(records) > self.settings.ingest.max_records_per_body:
                    return 413, {"error": f"more than {self.settings.ingest.max_records_per_body} records in one "
                                          "body (ingest.max_records_per_body)", "accepted": 0}
        except RecordError as exc:
            with self.lock:
                self.corrupt_total += 1
            return 400, {"error": f"record {len(records)} at byte {pos}: {exc}", "accepted": 0}
        foreign = next((i for i, r in enumerate(records) if r.fingerprint != fp), None)
        if foreign is not None:
            with self.lock:
                self.analyzer.stats.invalid_total["fingerprint"] += 1
            return 422, {"error": f"record {foreign} is of another model than the baseline's", "accepted": 0}
        with self.lock:
            if self._closing:
                return 503, {"error": "the sidecar is shutting down; retry", "accepted": 0}
            known = self._answered.get(key) if key is not None else None
            if known is None and key is not None:
                if key in self._in_progress:
                    return 409, {"error": "a body with this Idempotency-Key is being analyzed; retry",
                                 "accepted": 0}
                self._in_progress.add(key)
            if known is None:
                self._ingesting += 1
        if known is not None:  # waits for durability outside the lock (the checkpoint needs it)
            seq, accepted, invalid = known
            return self._durable_answer(seq, {"accepted": accepted, "corrupt": 0, "invalid": invalid,
                                              "duplicate": True})
        counts: dict[str, int] = {}
        try:
            with self._body_gate:  # a checkpoint holds all of a body or none of it
                self.ingest(records, counts=counts)
                refused = counts.get("invalid", 0)
                with self.lock:
                    self._ingest_seq += 1
                    seq = self._ingest_seq
                    if key is not None:
                        self._answered[key] = (seq, len(records) - refused, refused)
                        while len(self._answered) > self.settings.ingest.idempotency_keys:
                            self._answered.popitem(last=False)
        finally:
            with self.lock:
                self._ingesting -= 1
                self._in_progress.discard(key)
        return self._durable_answer(seq, {"accepted": len(records) - refused, "corrupt": 0, "invalid": refused})

    def _durable_answer(self, seq: int, answer: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """200 once a checkpoint covers body ``seq`` (at once without a checkpoint path)."""
        if self.settings.checkpoint.path is not None:
            self._wake.set()
            timeout = self.settings.ingest.ack_timeout_seconds
            with self._durable:
                durable = self._durable.wait_for(lambda: self._durable_seq >= seq, timeout=timeout)
            if not durable:
                log.warning("ingest: no checkpoint within %g s; answering without durability", timeout)
            answer["durable"] = durable
        return 200, answer

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

    def checkpoint_due(self) -> bool:
        """An alarm fired or an ingest body waits since the last checkpoint, or the interval passed. Not
        within a second of a failed write (a full disk must not make the source thread spin)."""
        now = time.monotonic()
        if self._checkpoint_failed_at is not None and now - self._checkpoint_failed_at < 1.0:
            return False
        return (self._alarm_pending or self._ingest_seq > self._durable_seq
                or now - self._last_checkpoint >= self.settings.checkpoint.interval_seconds)

    def request_stop(self) -> None:
        """Stop the source loop (the signal handlers call this)."""
        self.stop.set()
        self._wake.set()

    def close_ingest(self, timeout: float = 10.0) -> None:
        """Refuse new ingest bodies (503) and wait for those being analyzed, so that the final checkpoint
        covers every body that was answered or still waits for its answer."""
        with self.lock:
            self._closing = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if not self._ingesting:
                    return
            time.sleep(0.01)

    def run_source(self) -> None:
        while not self.stop.is_set():
            try:
                n = self.poll_once()
                if self.checkpoint_due():
                    self.checkpoint()
                if self.audit is not None:  # also when idle: the newest entries are authenticated in time
                    with self.lock:
                        try:
                            self.audit.maybe_checkpoint()
                        except (OSError, AuditError, ValueError) as exc:
                            self.audit_errors += 1
                            log.warning("audit trail: cannot checkpoint (%s)", exc)
                if n == 0 and self.kafka is None:
                    self._wake.wait(self.settings.source.poll_seconds)  # a waiting ingest body wakes it
                    self._wake.clear()
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


def start_http(sidecar: Sidecar) -> HttpServers:
    """Start the scrape listener (and the ingest listener when enabled); ``.shutdown()`` stops them."""
    return HttpServers(sidecar)


def serve(settings: Settings) -> int:
    """Run the sidecar until SIGTERM/SIGINT; returns the exit code."""
    threadpool_limits(settings.threads)  # process-wide: the analysis runs on small matrices
    sidecar = Sidecar(settings)
    server = start_http(sidecar)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: sidecar.request_stop())
    source = threading.Thread(target=sidecar.run_source, name="latentwatch-source", daemon=True)
    source.start()
    log.info("serving model %s on %s (baseline %s, %d detectors, probes: %s, pid %d)",
             sidecar.baseline.model, describe(server), settings.baseline, len(sidecar.baseline.slots),
             ", ".join(sidecar.probes.concepts) if sidecar.probes else "none", os.getpid())
    started = time.monotonic()
    while not sidecar.stop.wait(1.0):
        pass
    log.info("shutting down: draining the source")
    sidecar.close_ingest()  # new bodies get 503; those being analyzed finish
    source.join(timeout=10)
    try:
        sidecar.close_source()
    except Exception:
        log.exception("closing the source failed")
    sidecar.checkpoint()  # covers every analyzed body: those waiting for their answer get it now
    sidecar.close_audit()
    server.stop()
    log.info("stopped after %.0f s: %s", time.monotonic() - started, json.dumps(sidecar.summary()))
    return 0
