"""Grafana dashboards as code (Grafana's ``grafana-foundation-sdk``), committed as JSON in ``dashboards/``.

Three dashboards, each with template variables ``datasource``, ``model_name`` and ``site`` or ``concept``:

* **latentwatch / Overview** -- sidecars up, records analyzed, tap sampling and drops per replica and
  stage, invalid records by reason, firing alerts, analyzer and Kafka lag;
* **latentwatch / Concepts** -- concept rates against their baseline rates, probe score
  distributions, mean scores, the score-drift detectors, the loaded probes (with the caveat that a
  probe score is correlational evidence);
* **latentwatch / Internals** -- each detector's statistic against its calibrated threshold per site,
  attention-head statistics (window vs baseline mean), the components that moved most.

``latentwatch dashboards build`` writes the JSON; ``latentwatch dashboards push --url URL`` uploads
them to a Grafana through ``grafana-client`` (token from ``GRAFANA_TOKEN``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import dashboard as dash
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, table, text, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DataSourceRef,
    VariableRefresh,
    VariableSort,
)

from monitor.ops.rules import JOB_SELECTOR
from monitor.probes.probe import CAVEAT

DS = DataSourceRef(type_val="prometheus", uid="${datasource}")
M = 'model_name=~"$model_name"'
SITE = 'signal=~"(norm:|attn:)?($site)"'
CONCEPT = 'concept=~"$concept"'
RATE = "$__rate_interval"


def _query(expr: str, legend: str = "", instant: bool = False, ref: str = "A") -> prometheus.Dataquery:
    q = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DS)
    if legend:
        q = q.legend_format(legend)
    if instant:
        q = q.instant().format("table")
    return q


def _query_variable(name: str, label: str, query: str, regex: str = "") -> dash.QueryVariable:
    var = (dash.QueryVariable(name).label(label).datasource(DS).query(query)
           .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.NATURAL_ASC)
           .multi(True).include_all(True).all_value(".*"))
    return var.regex(regex) if regex else var


def _variables(d: dash.Dashboard, extra: str | None) -> dash.Dashboard:
    d = d.with_variable(dash.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    d = d.with_variable(_query_variable("model_name", "Model", "label_values(latentwatch_baseline_info, model_name)"))
    if extra == "site":
        d = d.with_variable(_query_variable(
            "site", "Site", f'label_values(latentwatch_drift_statistic{{{M}, signal!="scores"}}, signal)',
            "/^(?:norm:|attn:)?(.*)$/"))
    elif extra == "concept":
        d = d.with_variable(_query_variable("concept", "Concept",
                                            f"label_values(latentwatch_concept_ratio{{{M}}}, concept)"))
    return d


def _base(uid: str, title: str, description: str, extra: str | None) -> dash.Dashboard:
    d = (dash.Dashboard(title).uid(uid).description(description).tags(["latentwatch", "drift", "llm"])
         .refresh("30s").time("now-3h", "now").editable()
         .link(dash.DashboardLink("latentwatch").type("dashboards").tags(["latentwatch"]).as_dropdown(True)
               .include_vars(True).keep_time(True)))
    return _variables(d, extra)


def _ts(title: str, unit: str = "short", description: str = "") -> timeseries.Panel:
    return (timeseries.Panel().title(title).unit(unit).description(description).height(8).span(12).datasource(DS)
            .line_width(1).fill_opacity(10))


def overview() -> dash.Dashboard:
    d = _base("latentwatch-overview", "latentwatch / Overview",
              "Health and throughput of the latentwatch taps and sidecars, and what is firing.", None)
    d = d.with_row(dash.Row("Health"))
    d = d.with_panel(stat.Panel().title("Sidecars up").unit("short").height(4).span(6).datasource(DS)
                     .description("latentwatch sidecars that Prometheus scrapes successfully (up == 1).")
                     .with_target(_query(f"sum(up{{{JOB_SELECTOR}}})", instant=True)))
    d = d.with_panel(stat.Panel().title("Records analyzed / s").unit("reqps").height(4).span(6).datasource(DS)
                     .description("Signatures the sidecars analyzed per second, all models (5-minute rate).")
                     .with_target(_query(f"sum(rate(latentwatch_records_received_total{{{M}}}[{RATE}]))")))
    d = d.with_panel(stat.Panel().title("Detectors above threshold").height(4).span(6).datasource(DS)
                     .description("Detectors whose statistic is above its calibrated threshold now.")
                     .with_target(_query(f"count(latentwatch:drift_ratio:max{{{M}}} > 1) or vector(0)")))
    d = d.with_panel(stat.Panel().title("Tap drops / s").unit("reqps").height(4).span(6).datasource(DS)
                     .description("Sampled requests the taps dropped per second (queue full, sink errors): serving is "
                                  "never blocked, so overload shows here.")
                     .with_target(_query(f"sum(rate(latentwatch_tap_dropped_total{{{M}}}[{RATE}])) or vector(0)")))
    d = d.with_panel(table.Panel().title("Firing latentwatch alerts").height(6).span(24).datasource(DS)
                     .description("From Prometheus' ALERTS series; see docs/runbooks for each alert.")
                     .with_target(_query('ALERTS{alertname=~"Latentwatch.*", alertstate="firing"}', instant=True)))
    d = d.with_row(dash.Row("Throughput and losses"))
    d = d.with_panel(_ts("Records analyzed per second, by sidecar", "reqps",
                         "Records each sidecar received and analyzed, 5-minute rate.").with_target(
        _query(f"sum by (instance) (rate(latentwatch_records_received_total{{{M}}}[{RATE}]))", "{{instance}}")))
    d = d.with_panel(_ts("Requests sampled per second, by tap replica", "reqps",
                         "Requests each tap replica sampled into signatures, 5-minute rate.").with_target(
        _query(f"sum by (replica) (rate(latentwatch_tap_requests_sampled_total{{{M}}}[{RATE}]))", "{{replica}}")))
    d = d.with_panel(_ts("Tap drops per second, by replica and stage", "reqps",
                         "queue: the tap's worker was behind; transport: the sink or broker was down or slow")
                     .with_target(_query(f"sum by (replica, stage) (rate(latentwatch_tap_dropped_total{{{M}}}"
                                         f"[{RATE}]))", "{{replica}} {{stage}}")))
    d = d.with_panel(_ts("Invalid records per second, by reason", "reqps",
                         "Records the analyzer refused (another model, sites or dims, non-finite or implausible "
                         "values), by reason; they never touch the drift state.").with_target(
        _query(f"sum by (reason) (rate(latentwatch_records_invalid_total{{{M}}}[{RATE}]))", "{{reason}}")))
    d = d.with_row(dash.Row("Lag"))
    d = d.with_panel(_ts("Analyzer lag", "s", "Now minus the timestamp of the newest analyzed record").with_target(
        _query(f"max by (instance) (latentwatch_analyzer_lag_seconds{{{M}}})", "{{instance}}")))
    d = d.with_panel(_ts("Kafka consumer lag, by partition", "short",
                         "Records behind the fetch high watermark (Kafka source only)").with_target(
        _query(f"sum by (topic, partition) (latentwatch_kafka_consumer_lag{{{M}}})", "{{topic}}/{{partition}}")))
    return d


def concepts() -> dash.Dashboard:
    d = _base("latentwatch-concepts", "latentwatch / Concepts",
              "Concept probe scores and rates of live traffic against the baseline. " + CAVEAT, "concept")
    d = d.with_panel(text.Panel().title("How to read this").height(3).span(24)
                     .description("What the panels below show, and how far to trust a probe score.").content(
        "Each concept is scored by a linear probe on the model's activations. " + CAVEAT
        + " See each probe's card (`latentwatch probes show`) for its held-out and cross-source accuracy."))
    d = d.with_panel(_ts("Concept rate vs baseline rate", "percentunit",
                         "Share of the current window above each probe's threshold; dashed: the baseline's share")
                     .with_target(_query(f"max by (concept) (latentwatch_concept_ratio{{{M}, {CONCEPT}}})",
                                         "{{concept}}"))
                     .with_target(_query(f"max by (concept) (latentwatch_concept_baseline_ratio{{{M}, {CONCEPT}}})",
                                         "{{concept}} (baseline)", ref="B"))
                     .override_by_regexp(".*\\(baseline\\)", [{"id": "custom.lineStyle",
                                                               "value": {"fill": "dash", "dash": [10, 10]}}]))
    d = d.with_panel(_ts("Mean probe score", "percentunit",
                         "Average calibrated probe score per concept over the rate window (0-1).").with_target(
        _query(f"sum by (concept) (rate(latentwatch_concept_score_sum{{{M}, {CONCEPT}}}[{RATE}])) / "
               f"sum by (concept) (rate(latentwatch_concept_score_count{{{M}, {CONCEPT}}}[{RATE}]))", "{{concept}}")))
    d = d.with_panel(heatmap.Panel().title("Probe score distribution ($concept)").height(9).span(12).datasource(DS)
                     .description("Histogram of the concept's probe scores over time (requests per score bucket).")
                     .repeat("concept").max_per_row(2)
                     .with_target(_query(f"sum by (le) (increase(latentwatch_concept_score_bucket{{{M}, "
                                         f"{CONCEPT}}}[{RATE}]))", "{{le}}").format("heatmap")))
    d = d.with_panel(_ts("Score drift: statistic / calibrated threshold", "short",
                         "Above 1: the detector is in alarm (ks:scores per concept, rate:scores)").with_target(
        _query(f'latentwatch:drift_ratio:max{{{M}, signal="scores"}}', "{{detector}}")))
    d = d.with_panel(_ts("Mean score in window vs baseline", "percentunit",
                         "Mean probe score of the current window per concept, against the baseline's.").with_target(
        _query(f'max by (component) (latentwatch_signal_window_mean{{{M}, signal="scores"}})', "{{component}}"))
        .with_target(_query(f'max by (component) (latentwatch_signal_baseline_mean{{{M}, signal="scores"}})',
                            "{{component}} (baseline)", ref="B")))
    d = d.with_panel(table.Panel().title("Loaded probes").height(6).span(24).datasource(DS)
                     .description("Probes this sidecar loaded (concept, site, pooling, threshold).").with_target(
        _query(f"latentwatch_probe_info{{{M}}}", instant=True)))
    return d


def internals() -> dash.Dashboard:
    d = _base("latentwatch-internals", "latentwatch / Internals",
              "Drift statistics of activations and attention per site, against calibrated thresholds.", "site")
    d = d.with_panel(_ts("Statistic / threshold, by detector ($site)", "short",
                         "Each detector's statistic divided by its calibrated threshold; above 1 = alarm")
                     .with_target(_query(f"latentwatch:drift_ratio:max{{{M}, {SITE}}}", "{{detector}}"))
                     .span(24))
    d = d.with_panel(_ts("Statistic and threshold ($site)", "short",
                         "Each detector's statistic against its calibrated threshold.").repeat("site").max_per_row(2)
                     .with_target(_query(f"max by (detector) (latentwatch_drift_statistic{{{M}, {SITE}}})",
                                         "{{detector}}"))
                     .with_target(_query(f"max by (detector) (latentwatch_drift_threshold{{{M}, {SITE}}})",
                                         "{{detector}} threshold", ref="B")))
    d = d.with_panel(_ts("Attention-head statistics: window mean", "short",
                         "Per head and statistic (entropy, first_token_mass, mean_distance, max_weight)")
                     .with_target(_query(f'max by (signal, component) (latentwatch_signal_window_mean{{{M}, '
                                         f'signal=~"attn:($site)"}})', "{{signal}} {{component}}")))
    d = d.with_panel(_ts("Attention-head statistics: window − baseline mean", "short",
                         "Per head and statistic, window mean minus baseline mean.").with_target(
        _query(f'max by (signal, component) (latentwatch_signal_window_mean{{{M}, signal=~"attn:($site)"}}) - '
               f'max by (signal, component) (latentwatch_signal_baseline_mean{{{M}, signal=~"attn:($site)"}})',
               "{{signal}} {{component}}")))
    d = d.with_panel(table.Panel().title("What moved most (detectors in alarm)").height(8).span(24).datasource(DS)
                     .description("Top components of each detector in alarm: concepts, head.stat, principal "
                                  "directions pcN of a site's activations (signed contribution)")
                     .with_target(_query(f"max by (detector, component, rank) (latentwatch_drift_attribution{{{M}}})",
                                         instant=True)))
    return d


BUILDERS = {"overview": overview, "concepts": concepts, "internals": internals}


def build_all() -> dict[str, dict[str, Any]]:
    """Each dashboard as the JSON object Grafana stores."""
    encoder = JSONEncoder(sort_keys=True, indent=2)
    return {name: json.loads(encoder.encode(make().build())) for name, make in BUILDERS.items()}


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, obj in build_all().items():
        path = out / f"latentwatch-{name}.json"
        path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
        paths.append(path)
    return paths


def panel_queries(obj: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(panel title, PromQL)`` of every panel target of a dashboard JSON (rows included)."""
    panels = list(obj.get("panels", []))
    while panels:
        panel = panels.pop(0)
        panels.extend(panel.get("panels", []))
        for target in panel.get("targets", []) or []:
            if target.get("expr"):
                yield panel.get("title", ""), target["expr"]


def push(url: str, token: str | None, dashboards: dict[str, dict[str, Any]], folder_uid: str | None = None,
         timeout: float = 30.0) -> list[dict[str, Any]]:
    """Create or overwrite each dashboard in the Grafana at ``url`` (``grafana-client``)."""
    from grafana_client import GrafanaApi

    api = GrafanaApi.from_url(url, credential=token or None, timeout=timeout)
    answers = []
    for obj in dashboards.values():
        payload: dict[str, Any] = {"dashboard": {**obj, "id": None}, "overwrite": True,
                                   "message": "latentwatch dashboards push"}
        if folder_uid:
            payload["folderUid"] = folder_uid
        answers.append(api.dashboard.update_dashboard(payload))
    return answers


def concrete(expr: str, rate_interval: str = "1m", **variables: str) -> str:
    """A panel query with Grafana's variables replaced (for promtool and for querying Prometheus)."""
    values = {"model_name": ".*", "site": ".*", "concept": ".*", **variables}
    expr = expr.replace("$__rate_interval", rate_interval)
    for name in sorted(values, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", values[name]).replace("$" + name, values[name])
    return expr
