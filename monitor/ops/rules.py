"""Prometheus recording and alerting rules for latentwatch, generated as a monitoring mixin would ship them.

``latentwatch alerts build`` writes ``alerts/latentwatch.rules.yml`` (load it with ``rule_files``) and
``deploy/kubernetes/prometheusrule.yaml`` (the same groups as a Prometheus Operator PrometheusRule).
Both are committed; ``alerts/tests/*.test.yml`` are their ``promtool test rules`` unit tests and
``docs/runbooks/<AlertName>.md`` their runbooks.

Severity: ``critical`` pages (Alertmanager's paging route), ``warning`` opens a ticket.

Every alert names what drifted: ``model_name``, ``detector`` (= ``test:signal``), ``signal`` (probe
scores, or the site: ``act``/``norm``/``attn`` + layer), ``concept`` for concept rates, and its
description lists the components that moved most (concepts, ``head.stat`` of attention sites,
principal directions of activation sites) read from ``latentwatch_drift_attribution``.

How often may a drift alert fire without drift? Each detector's threshold is calibrated on held-out
baseline traffic so that all detectors together cross upwards at most once per
``false_alarm_every_records`` records (``latentwatch_baseline_info``; docs/analyzer.md). An alert
additionally needs the crossing to last ``for:``, so its false-alarm rate is at most that.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

RUNBOOK_BASE = "https://github.com/latentwatch/latentwatch/blob/main/docs/runbooks"
GRAFANA_URL = "http://localhost:3000"  # where the dashboards of monitor/ops/dashboards.py are loaded
JOB_SELECTOR = 'job=~".*latentwatch.*"'


@dataclass(frozen=True)
class AlertSpec:
    name: str
    severity: str
    expr: str
    for_seconds: int
    summary: str
    description: str
    extra_labels: tuple[tuple[str, str], ...] = ()
    dashboard: str = "latentwatch-overview"  # uid of the dashboard to open first


ATTRIBUTION = (
    '{{ range query (printf "topk(3, max by (component) (latentwatch_drift_attribution{model_name=%q, '
    'detector=%q}))" $labels.model_name $labels.detector) }}{{ .Labels.component }} '
    '({{ .Value | printf "%+.3g" }}) {{ end }}'
)

RECORDING = [
    ("latentwatch:drift_ratio:max",
     "max by (model_name, detector, test, signal) (latentwatch_drift_statistic / latentwatch_drift_threshold)"),
    ("latentwatch:records_received:rate5m", "sum by (model_name) (rate(latentwatch_records_received_total[5m]))"),
    ("latentwatch:records_invalid:rate5m",
     "sum by (model_name, reason) (rate(latentwatch_records_invalid_total[5m]))"),
    ("latentwatch:tap_requests_sampled:rate5m",
     "sum by (model_name, replica) (rate(latentwatch_tap_requests_sampled_total[5m]))"),
    ("latentwatch:tap_dropped:rate5m",
     "sum by (model_name, replica, stage) (rate(latentwatch_tap_dropped_total[5m]))"),
    ("latentwatch:concept_ratio:max", "max by (model_name, concept) (latentwatch_concept_ratio)"),
    ("latentwatch:concept_baseline_ratio:max", "max by (model_name, concept) (latentwatch_concept_baseline_ratio)"),
    # per concept: the window's binomial tail against the rate detector's calibrated threshold (the same budget)
    ("latentwatch:concept_surge_ratio:max",
     "max by (model_name, concept) (latentwatch_concept_surge_statistic / on (instance, model_name) group_left "
     "latentwatch_concept_surge_threshold)"),
    # per concept: how far the window's probe logits are beyond what held-out ordinary sources reach
    ("latentwatch:probe_validity_ratio:max",
     "max by (model_name, concept) (latentwatch_probe_validity_ratio / on (instance, model_name, concept) "
     "latentwatch_probe_validity_threshold)"),
]


def alert_specs(job_selector: str = JOB_SELECTOR, lag_records: int = 10_000) -> list[AlertSpec]:
    return [
        AlertSpec(
            "LatentwatchConceptDrift", "critical", 'latentwatch:drift_ratio:max{signal="scores"} > 1', 120,
            "{{ $labels.model_name }}: probe scores drifted ({{ $labels.test }})",
            "The distribution of concept probe scores of {{ $labels.model_name }} is {{ $value | printf \"%.2f\" }}x "
            "the calibrated threshold of {{ $labels.detector }}. Concepts that moved most: " + ATTRIBUTION
            + "Probe scores are correlational evidence, not proof of the concept: confirm on the Concepts dashboard.",
            dashboard="latentwatch-concepts"),
        AlertSpec(
            "LatentwatchInternalDrift", "warning", 'latentwatch:drift_ratio:max{signal!="scores"} > 1', 300,
            "{{ $labels.model_name }}: internals drifted at {{ $labels.signal }} ({{ $labels.test }})",
            "{{ $labels.detector }} on {{ $labels.model_name }} is {{ $value | printf \"%.2f\" }}x its calibrated "
            "threshold: the model's activations or attention at {{ $labels.signal }} no longer look like the "
            "baseline. Moved most: " + ATTRIBUTION, dashboard="latentwatch-internals"),
        AlertSpec(
            "LatentwatchConceptRateSurge", "critical", "latentwatch:concept_surge_ratio:max > 1", 120,
            "{{ $labels.model_name }}: {{ $labels.concept }} rate surged",
            "{{ with printf \"latentwatch:concept_ratio:max{model_name=%q, concept=%q}\" $labels.model_name "
            "$labels.concept | query }}{{ . | first | value | humanizePercentage }}{{ end }} of the last window of "
            "{{ $labels.model_name }}'s requests score above the {{ $labels.concept }} probe threshold, against "
            "{{ with printf \"latentwatch:concept_baseline_ratio:max{model_name=%q, concept=%q}\" $labels.model_name "
            "$labels.concept | query }}{{ . | first | value | humanizePercentage }}{{ end }} in the baseline: "
            "{{ $value | printf \"%.2f\" }}x the calibrated threshold of rate:scores (a share that high comes from "
            "no-drift traffic less often than the false-alarm budget allows). "
            "Probe scores are correlational evidence: confirm on the Concepts dashboard.",
            dashboard="latentwatch-concepts"),
        AlertSpec(
            "LatentwatchProbeOutOfDomain", "warning", "latentwatch:probe_validity_ratio:max > 1", 600,
            "{{ $labels.model_name }}: {{ $labels.concept }} probe scores are not trustworthy on current traffic",
            "The median {{ $labels.concept }} probe logit over the last window of {{ $labels.model_name }}'s "
            "requests is {{ $value | printf \"%.2f\" }}x beyond what held-out ordinary sources reached when the "
            "probe was carded: current traffic is unlike the text the probe was trained and validated on, so its "
            "false-positive rate is unknown and drift attributed to {{ $labels.concept }} is marked "
            "'(probe out of domain)'. Check the Concepts dashboard; run `latentwatch probes eval` on a sample.",
            dashboard="latentwatch-concepts"),
        AlertSpec(
            "LatentwatchSidecarDown", "critical", f"up{{{job_selector}}} == 0", 120,
            "latentwatch sidecar {{ $labels.instance }} is down",
            "Prometheus cannot scrape {{ $labels.instance }} ({{ $labels.job }}): the model it watches is "
            "not monitored."),
        AlertSpec(
            "LatentwatchTapSilent", "warning", "latentwatch:records_received:rate5m == 0", 900,
            "{{ $labels.model_name }}: no signatures arriving",
            "The sidecars of {{ $labels.model_name }} received no records for 15 minutes while running: the tap "
            "is detached, sampling 0 %, its sink cannot reach the sidecar, or the model serves no traffic."),
        AlertSpec(
            "LatentwatchTapDropping", "warning",
            "latentwatch:tap_dropped:rate5m / on (model_name, replica) group_left "
            "clamp_min(latentwatch:tap_requests_sampled:rate5m, 1e-9) > 0.05", 900,
            "{{ $labels.model_name }}: tap on {{ $labels.replica }} drops {{ $value | humanizePercentage }} "
            "({{ $labels.stage }})",
            "The tap on {{ $labels.replica }} drops {{ $value | humanizePercentage }} of its sampled requests at "
            "the {{ $labels.stage }} stage (queue: its worker is behind; transport: the sink or broker is slow or "
            "down). Serving is not affected; drift statistics see fewer records."),
        AlertSpec(
            "LatentwatchInvalidRecords", "warning",
            'sum by (model_name) (latentwatch:records_invalid:rate5m{reason=~"corrupt|nonfinite|implausible"}) / '
            "clamp_min(latentwatch:records_received:rate5m, 1e-9) > 0.01", 900,
            "{{ $labels.model_name }}: {{ $value | humanizePercentage }} of records are corrupt, non-finite or "
            "implausible",
            "More than 1 % of {{ $labels.model_name }}'s records are refused as corrupt, NaN/inf or physically "
            "implausible (beyond 10x the baseline's largest value). They are "
            "counted and skipped; the rest is analyzed."),
        AlertSpec(
            "LatentwatchModelMismatch", "critical",
            'sum by (model_name) (latentwatch:records_invalid:rate5m{reason=~"fingerprint|shape"}) / '
            "clamp_min(latentwatch:records_received:rate5m, 1e-9) > 0.5", 600,
            "{{ $labels.model_name }}: records do not match the baseline's model",
            "{{ $value | humanizePercentage }} of the records reaching the {{ $labels.model_name }} monitor come "
            "from a model (fingerprint) or sites other than the baseline's and probes': the model was changed "
            "without a new baseline and probes, so drift is not being checked."),
        AlertSpec(
            "LatentwatchConsumerLag", "warning",
            f"sum by (model_name, topic) (latentwatch_kafka_consumer_lag) > {lag_records}", 600,
            "{{ $labels.model_name }}: monitors are {{ $value }} records behind on {{ $labels.topic }}",
            "The latentwatch consumer group for {{ $labels.topic }} is more than "
            f"{lag_records:,} records behind the newest signatures: alerts come late. Scale the sidecars."),
        AlertSpec(
            "LatentwatchKafkaDisconnected", "warning", "latentwatch_kafka_connected == 0", 300,
            "latentwatch sidecar {{ $labels.instance }} cannot reach Kafka",
            "{{ $labels.instance }} has not reached the brokers for {{ $labels.topic }} in 5 minutes; its "
            "partitions are not being analyzed."),
    ]


def _duration(seconds: float) -> str:
    seconds = max(1, round(seconds))
    return f"{seconds // 60}m" if seconds % 60 == 0 else f"{seconds}s"


def dashboard_url(spec: AlertSpec, grafana_url: str = GRAFANA_URL) -> str:
    """The alert's dashboard, filtered to the alert's model when the alert has that label."""
    url = f"{grafana_url.rstrip('/')}/d/{spec.dashboard}"
    return url + "?var-model_name={{ $labels.model_name }}" if "$labels.model_name" in spec.summary else url


def rule_groups(runbook_base: str = RUNBOOK_BASE, for_scale: float = 1.0, grafana_url: str = GRAFANA_URL,
                **thresholds: Any) -> dict[str, Any]:
    """The rule file as a dict. ``for_scale`` shortens every ``for:`` (end-to-end tests only)."""
    alerts = []
    for spec in alert_specs(**thresholds):
        alerts.append({
            "alert": spec.name, "expr": spec.expr, "for": _duration(spec.for_seconds * for_scale),
            "labels": {"severity": spec.severity, **dict(spec.extra_labels)},
            "annotations": {"summary": spec.summary, "description": spec.description,
                            "runbook_url": f"{runbook_base.rstrip('/')}/{spec.name}.md",
                            "dashboard_url": dashboard_url(spec, grafana_url)},
        })
    groups: list[dict[str, Any]] = [
        {"name": "latentwatch.rules", "rules": [{"record": name, "expr": expr} for name, expr in RECORDING]},
        {"name": "latentwatch.alerts", "rules": alerts},
    ]
    if for_scale != 1.0:  # evaluate every second too, or the shortened for: means nothing
        for group in groups:
            group["interval"] = "1s"
    return {"groups": groups}


def to_yaml(obj: Any) -> str:
    return yaml.safe_dump(obj, sort_keys=False, width=1_000, allow_unicode=True)


HEADER = "# Generated by `latentwatch alerts build` from monitor/ops/rules.py -- edit that, not this file.\n"


def prometheus_rule(groups: dict[str, Any], namespace: str = "monitoring") -> dict[str, Any]:
    """The same groups as a Prometheus Operator ``PrometheusRule``."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
            "metadata": {"name": "latentwatch", "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": "latentwatch", "release": "prometheus"}},
            "spec": groups}


def write(rules_path: Path, crd_path: Path | None, runbook_base: str = RUNBOOK_BASE,
          grafana_url: str = GRAFANA_URL) -> list[Path]:
    groups = rule_groups(runbook_base, grafana_url=grafana_url)
    rules_path.parent.mkdir(parents=True, exist_ok=True)
    rules_path.write_text(HEADER + to_yaml(groups))
    written = [rules_path]
    if crd_path is not None:
        crd_path.parent.mkdir(parents=True, exist_ok=True)
        crd_path.write_text(HEADER + to_yaml(prometheus_rule(groups)))
        written.append(crd_path)
    return written
