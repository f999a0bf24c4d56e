"""Prometheus metrics of the sidecar, read from the analyzer at scrape time (a custom collector).

Names follow Prometheus conventions: prefix ``latentwatch_``, base units, ``_total`` counters.
Labels are bounded: ``model_name`` (one per baseline), ``detector`` (fixed by the baseline),
``concept`` (fixed by the probe set), ``reason`` (4 values), ``stage`` (2), ``topic`` and
``partition`` (the partitions of one topic), ``replica`` (capped by
``max_replicas``; further replicas are counted under ``replica="other"``), and ``component`` /
``rank`` only for the top ``attribution_top`` components of detectors in alarm. No request ids.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from monitor.analysis.analyzer import Analyzer
from monitor.analysis.baseline import Baseline
from monitor.probes.probe import ProbeSet

SCORE_BUCKETS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]


class MonitorState(Protocol):
    """What the exporter reads at scrape time (the sidecar service provides it; no import of the service)."""

    lock: threading.Lock
    analyzer: Analyzer
    baseline: Baseline
    probes: ProbeSet | None
    settings: Any
    kafka: Any
    replicas: dict[str, dict[str, int]]
    corrupt_total: int
    last_record_ts: float
    score_buckets: np.ndarray
    score_sum: np.ndarray

    def window_rates(self) -> dict[str, float]: ...


def _single(name: str, doc: str, model: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=["model_name"])
    family.add_metric([model], value)
    return family


class SidecarCollector(Collector):
    def __init__(self, sidecar: MonitorState) -> None:
        self.sidecar = sidecar

    def collect(self) -> Iterator:
        sc = self.sidecar
        with sc.lock:
            yield from self._collect(sc)

    def _collect(self, sc: MonitorState) -> Iterator:
        a, base, m = sc.analyzer, sc.baseline, sc.baseline.model
        received = CounterMetricFamily("latentwatch_records_received", "Records received by the sidecar",
                                       labels=["model_name"])
        received.add_metric([m], a.stats.records_total)
        yield received
        audit = getattr(sc, "audit", None)
        if audit is not None:  # the witness outside the audit folder: a cut tail shows against it
            ckpt = GaugeMetricFamily("latentwatch_audit_checkpoint_seq", "Seq of the newest authenticated audit "
                                     "checkpoint (latentwatch audit verify --expect-seq)", labels=["model_name"])
            ckpt.add_metric([m], audit.checkpoint_seq)
            yield ckpt
            entries = CounterMetricFamily("latentwatch_audit_entries", "Entries this sidecar wrote to the audit "
                                          "trail", labels=["model_name"])
            entries.add_metric([m], audit.entries_total)
            yield entries
            errors = CounterMetricFamily("latentwatch_audit_errors", "Batches the audit trail could not record "
                                         "(full or failing volume): analyzed, not audited", labels=["model_name"])
            errors.add_metric([m], sc.audit_errors)
            yield errors
        invalid = CounterMetricFamily("latentwatch_records_invalid", "Records refused, by reason",
                                      labels=["model_name", "reason"])
        for reason in ("fingerprint", "shape", "nonfinite", "implausible", "corrupt"):
            value = sc.corrupt_total if reason == "corrupt" else a.stats.invalid_total.get(reason, 0)
            invalid.add_metric([m, reason], value)
        yield invalid
        sampled = CounterMetricFamily("latentwatch_tap_requests_sampled", "Requests the tap sampled, as reported "
                                      "by its records", labels=["model_name", "replica"])
        dropped = CounterMetricFamily("latentwatch_tap_dropped", "Sampled requests the tap dropped, as last reported; "
                                      "stage=queue: its worker was behind, stage=transport: the sink (broker) was",
                                      labels=["model_name", "replica", "stage"])
        now, ttl = time.time(), getattr(sc.settings, "replica_ttl_seconds", float("inf"))
        for replica, counters in sorted(sc.replicas.items()):
            if now - counters.get("seen_at", now) > ttl:
                continue  # stale: expired (and dropped at the next batch)
            sampled.add_metric([m, replica], counters.get("sampled", 0))
            dropped.add_metric([m, replica, "queue"], counters.get("dropped", 0))
            dropped.add_metric([m, replica, "transport"], counters.get("sink_dropped", 0))
        yield from (sampled, dropped)
        if sc.kafka is not None:
            yield from sc.kafka.collect(m)

        stat = GaugeMetricFamily("latentwatch_drift_statistic", "Current drift statistic of each detector",
                                 labels=["model_name", "detector", "test", "signal"])
        thr = GaugeMetricFamily("latentwatch_drift_threshold", "Calibrated threshold of each detector",
                                labels=["model_name", "detector", "test", "signal"])
        alarm = GaugeMetricFamily("latentwatch_drift_alarm", "1 while the detector is above its threshold",
                                  labels=["model_name", "detector", "test", "signal"])
        alarms = CounterMetricFamily("latentwatch_drift_alarms", "Alarms fired (upward threshold crossings)",
                                     labels=["model_name", "detector", "test", "signal"])
        attribution = GaugeMetricFamily(
            "latentwatch_drift_attribution", "Top components of detectors in alarm (signed contribution)",
            labels=["model_name", "detector", "component", "rank"])
        for st in a.states:
            test, _, signal = st.slot.name.partition(":")
            labels = [m, st.slot.name, test, signal]
            stat.add_metric(labels, st.value if np.isfinite(st.value) else float("nan"))
            thr.add_metric(labels, st.slot.threshold)
            alarm.add_metric(labels, float(st.alarm))
            alarms.add_metric(labels, st.alarms_total)
            if st.alarm:
                for rank, (comp, value) in enumerate(a.attribution(st, top=sc.settings.attribution_top), 1):
                    attribution.add_metric([m, st.slot.name, comp, str(rank)], value)
        yield from (stat, thr, alarm, alarms, attribution)
        window_mean = GaugeMetricFamily(
            "latentwatch_signal_window_mean", "Mean of each component (probe score, attention-head statistic, "
            "activation norm) over the current window", labels=["model_name", "signal", "component"])
        base_mean = GaugeMetricFamily("latentwatch_signal_baseline_mean", "The same mean in the baseline",
                                      labels=["model_name", "signal", "component"])
        for st, live, ref in a.window_means():
            signal = st.slot.family
            for name, w, r in zip(st.slot.components, live, ref, strict=True):
                window_mean.add_metric([m, signal, name], float(w))
                base_mean.add_metric([m, signal, name], float(r))
        yield from (window_mean, base_mean)

        if sc.probes is not None:
            hist = HistogramMetricFamily("latentwatch_concept_score", "Probe scores of received records",
                                         labels=["model_name", "concept"])
            for j, concept in enumerate(sc.probes.concepts):
                counts = sc.score_buckets[j]
                cum = np.cumsum(counts)
                buckets = [(str(b), float(c)) for b, c in zip(SCORE_BUCKETS, cum, strict=True)]
                buckets.append(("+Inf", float(cum[-1])))
                hist.add_metric([m, concept], buckets, float(sc.score_sum[j]))
            yield hist
            rate = GaugeMetricFamily("latentwatch_concept_ratio",
                                     "Share of the current window above the probe threshold",
                                     labels=["model_name", "concept"])
            base_rate = GaugeMetricFamily("latentwatch_concept_baseline_ratio", "Share above threshold in the baseline",
                                          labels=["model_name", "concept"])
            window = sc.window_rates()
            for concept in sc.probes.concepts:
                rate.add_metric([m, concept], window.get(concept, float("nan")))
                base_rate.add_metric([m, concept], base.info.get("concept_base_rates", {}).get(concept, float("nan")))
            yield rate
            yield base_rate
            surge = a.concept_surge()
            if surge is not None:
                stat_by_concept, threshold = surge
                surge_stat = GaugeMetricFamily(
                    "latentwatch_concept_surge_statistic", "Per concept: -log10 of the binomial tail probability of "
                    "the current window's share above the probe threshold, given the baseline share",
                    labels=["model_name", "concept"])
                for concept, value in stat_by_concept.items():
                    surge_stat.add_metric([m, concept], value)
                yield surge_stat
                yield _single("latentwatch_concept_surge_threshold",
                              "Calibrated threshold of the concept surge statistic (the rate:scores detector's)", m,
                              threshold)
            validity = a.probe_validity()
            if validity:  # only probes whose artifact carries a validity reference (issue 13)
                vr = GaugeMetricFamily("latentwatch_probe_validity_ratio",
                                       "Window-median probe logit excess over held-out negatives, in units of its "
                                       "calibrated threshold: above latentwatch_probe_validity_threshold the "
                                       "probe's scores are not trustworthy on current traffic",
                                       labels=["model_name", "concept"])
                vt = GaugeMetricFamily("latentwatch_probe_validity_threshold",
                                       "Validity ratio above which a probe is out of its domain",
                                       labels=["model_name", "concept"])
                for concept, (ratio, threshold) in validity.items():
                    vr.add_metric([m, concept], ratio)
                    vt.add_metric([m, concept], threshold)
                yield vr
                yield vt
            info = InfoMetricFamily("latentwatch_probe", "Loaded probes (correlational evidence, see probe cards)",
                                    labels=["model_name", "concept"])
            for p in sc.probes.probes:
                info.add_metric([m, p.concept], {"site": p.site, "pooling": p.pooling,
                                                 "held_out_auroc": str(p.card.get("held_out", {}).get("auroc", ""))})
            yield info

        binfo = InfoMetricFamily("latentwatch_baseline", "Loaded baseline", labels=["model_name"])
        cal = base.info.get("calibration", {})
        # not the model fingerprint: records are checked against it, so it is not published (docs/sidecar.md)
        binfo.add_metric([m], {"baseline_sha256": getattr(sc, "baseline_sha256", "")[:16],
                               "created": str(base.info.get("created", "")),
                               "window": str(base.config.window), "stride": str(base.config.stride),
                               "false_alarm_every_records": str(cal.get("target_records_between_false_alarms", ""))})
        yield binfo
        lag = GaugeMetricFamily("latentwatch_analyzer_lag_seconds",
                                "Now minus the timestamp of the newest analyzed record", labels=["model_name"])
        lag.add_metric([m], time.time() - sc.last_record_ts if sc.last_record_ts else float("nan"))
        yield lag
        last = GaugeMetricFamily("latentwatch_last_record_timestamp_seconds",
                                 "Timestamp of the newest analyzed record", labels=["model_name"])
        last.add_metric([m], sc.last_record_ts or float("nan"))
        yield last
