"""An HTML report for a recorded stream against a baseline: what an on-call person opens first.

The records are run through a fresh analyzer (the same code as the sidecar), and the report shows:
every drift statistic over the stream with its calibrated threshold (and the true shift point when
known), probe-score distributions before and after the shift (or first and second half), the alarms
with their attribution, and the concept rates. Plots are PNGs embedded in one self-contained file.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from collectors.record import Record
from monitor.analysis.analyzer import Analyzer
from monitor.analysis.baseline import Baseline
from monitor.probes.probe import CAVEAT, ProbeSet


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


#: What each detector's statistic measures, for the y axis (detectors not listed say "statistic").
STATISTIC_UNITS = {
    "ks": "KS distance (0-1)", "psi": "PSI", "wasserstein": "W1 (baseline sd)", "mmd": "MMD² (RFF)",
    "meanshift": "T²/k", "pca_error": "z (std. errors)", "rate": "z (std. errors)",
}


def time_axis(ts: np.ndarray) -> tuple[np.ndarray, str]:
    """Record timestamps → (x values, axis label): time since the first record in s, min or h, or the
    record number when the timestamps do not increase (a stream written with no clock)."""
    ts = np.asarray(ts, dtype=np.float64)
    if len(ts) < 2 or not np.isfinite(ts).all() or np.any(np.diff(ts) < 0) or ts[-1] - ts[0] <= 0:
        return np.arange(1, len(ts) + 1, dtype=np.float64), "record number"
    rel = ts - ts[0]
    for limit, div, unit in ((120, 1, "s"), (7200, 60, "min"), (float("inf"), 3600, "h")):
        if rel[-1] < limit:
            return rel / div, f"time since first record ({unit})"
    raise AssertionError("unreachable")


def build_report(records: Sequence[Record], baseline: Baseline, probes: ProbeSet | None,
                 shift_at: int | None = None, title: str = "latentwatch drift report",
                 explanations: Sequence[dict] = ()) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    analyzer = Analyzer(baseline, probes, log_alarms=False)  # the report lists the alarms itself
    history: list[tuple[int, list[float]]] = []
    events = []
    step = baseline.config.stride
    for i in range(0, len(records), step):
        events += analyzer.update(records[i : i + step])
        if analyzer.states:
            history.append((analyzer.valid_seen, [st.value for st in analyzer.states]))
    names = [st.slot.name for st in analyzer.states]
    kinds = [st.slot.kind for st in analyzer.states]
    thresholds = [st.slot.threshold for st in analyzer.states]
    split = shift_at if shift_at is not None else len(records) // 2
    valid = [r for r in records if r.fingerprint == baseline.fingerprint]
    # x position of the n-th valid record (the analyzer counts valid records): time when the clock allows
    xs, xlabel = time_axis(np.array([r.ts for r in valid]))

    def x_of(count: int) -> float:
        return float(xs[min(max(count, 1), len(xs)) - 1]) if len(xs) else float(count)

    shift_x = x_of(shift_at) if shift_at is not None and 0 < shift_at <= len(xs) else None

    def mark(ax, alarm_xs: list[float]) -> None:
        if shift_x is not None:
            ax.axvline(shift_x, color="#555", ls=":", lw=1, label="shift")
        for k, ax_x in enumerate(alarm_xs):
            ax.axvline(ax_x, color="#d62728", lw=0.8, alpha=0.5, label="alarm" if k == 0 else None)

    sections = []
    # statistic over time, one small panel per detector, alarms marked
    if history:
        x = np.array([x_of(h[0]) for h in history])
        vals = np.array([h[1] for h in history], dtype=float)
        cols = 3
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(12, 2.6 * rows), squeeze=False)
        for k, name in enumerate(names):
            ax = axes[k // cols][k % cols]
            ax.plot(x, vals[:, k], lw=1.2, color="#1f77b4", label="statistic")
            ax.axhline(thresholds[k], color="#d62728", ls="--", lw=1, label="threshold")
            mark(ax, [x_of(e.at_record) for e in events if e.detector == name])
            ax.set_title(name, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=7)
            ax.set_ylabel(STATISTIC_UNITS.get(kinds[k], "statistic"), fontsize=7)
            ax.tick_params(labelsize=7)
        axes[0][0].legend(fontsize=6, loc="upper left")
        for k in range(len(names), rows * cols):
            axes[k // cols][k % cols].axis("off")
        fig.tight_layout()
        sections.append(("Drift statistics over the stream (dashed: calibrated threshold; red: alarms fired"
                         + ("; dotted: shift" if shift_at is not None else "") + ")", _png(fig)))
    # per concept: share of hits in a sliding window over time, against the baseline's share
    if probes is not None and valid:
        scores = probes.score(valid)
        hit = probes.above(scores).astype(np.float64)
        k = len(probes.concepts)
        w = min(baseline.config.window, len(valid))
        cs = np.concatenate([np.zeros((1, k)), np.cumsum(hit, axis=0)])
        rolling = (cs[w:] - cs[:-w]) / w  # [n - w + 1, k]: the window ending at record w, w+1, ...
        base_rates = baseline.info.get("concept_base_rates", {})
        rate_alarms = [x_of(e.at_record) for e in events if e.detector.startswith("rate:")]
        fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 2.6), squeeze=False)
        for j, concept in enumerate(probes.concepts):
            ax = axes[0][j]
            ax.plot(xs[w - 1:], rolling[:, j], lw=1.2, color="#2ca02c", label=f"last {w} records")
            if concept in base_rates:
                ax.axhline(base_rates[concept], color="#555", ls="--", lw=1, label="baseline")
            mark(ax, rate_alarms)
            ax.set_ylim(0, 1)
            ax.set_title(concept, fontsize=9)
            ax.set_xlabel(xlabel, fontsize=7)
            ax.set_ylabel("share of requests at or above threshold", fontsize=6)
            ax.tick_params(labelsize=7)
        axes[0][0].legend(fontsize=6, loc="upper left")
        fig.tight_layout()
        sections.append(("Concept hit share over time (sliding window; dashed: baseline share)", _png(fig)))
        # score distributions before / after
        fig, axes = plt.subplots(1, k, figsize=(3.2 * k, 2.6), squeeze=False)
        for j, concept in enumerate(probes.concepts):
            ax = axes[0][j]
            bins = np.linspace(0, 1, 21)
            for part, label in ((scores[:split, j], "before"), (scores[split:, j], "after")):
                if len(part):
                    ax.hist(part, bins=bins, alpha=0.6, density=True, label=label)
            ax.axvline(probes.thresholds[j], color="#d62728", ls="--", lw=1, label="threshold")
            ax.set_title(concept, fontsize=9)
            ax.set_xlabel("probe score (0-1)", fontsize=7)
            ax.set_ylabel("density", fontsize=7)
            ax.tick_params(labelsize=7)
        axes[0][0].legend(fontsize=6)
        fig.tight_layout()
        label = "the shift" if shift_at is not None else "the middle of the stream"
        sections.append((f"Probe score distributions before and after {label}", _png(fig)))

    def moved(e) -> str:
        return html.escape(", ".join(f"{n} {v:+.3g}" for n, v in e.attribution[:4]))

    alarm_rows = "".join(
        f"<tr><td>{html.escape(e.detector)}</td><td>{e.at_record}</td><td>{x_of(e.at_record):.4g}</td>"
        f"<td>{'' if shift_at is None else e.at_record - shift_at}</td><td>{e.statistic:.4g}</td>"
        f"<td>{e.threshold:.4g}</td><td>{moved(e)}</td><td>{html.escape(', '.join(e.exemplars))}</td></tr>"
        for e in events)
    rate_rows = ""
    validity = analyzer.probe_validity()  # at the end of the stream; only probes with a validity reference
    if probes is not None and valid:
        base_rates = baseline.info.get("concept_base_rates", {})
        for j, c in enumerate(probes.concepts):
            before = float(hit[:split, j].mean()) if split else float("nan")
            after = float(hit[split:, j].mean()) if len(scores) > split else float("nan")
            ratio = validity.get(c, (float("nan"), 1.0))[0]
            verdict = "no reference" if c not in validity else (
                "window not full" if not np.isfinite(ratio) else
                f"{ratio:.2f}: {'OUT OF DOMAIN, scores not trustworthy' if ratio > 1 else 'in domain'}")
            rate_rows += (f"<tr><td>{html.escape(c)}</td><td>{base_rates.get(c, float('nan')):.3f}</td>"
                          f"<td>{before:.3f}</td><td>{after:.3f}</td><td>{verdict}</td></tr>")
    examples = baseline.info.get("direction_exemplars", {})

    def along(detector: str, component: str, value: float) -> str:
        """Baseline records farthest along a principal direction, on the side the window moved to."""
        keys = examples.get(detector, {}).get(component.split(" ", 1)[0], {}).get("up" if value >= 0 else "down", [])
        return html.escape(", ".join(keys))

    ranking_rows = "".join(f"<tr><td>{html.escape(d)}</td><td>{html.escape(c)}</td><td>{v:+.3g}</td>"
                           f"<td>{along(d, c, v)}</td></tr>" for d, c, v in analyzer.ranking(top=12))
    cal = baseline.info.get("calibration", {})
    explained = "".join(explanation_html(x) for x in explanations)
    figures = "".join(f'<h2>{html.escape(t)}</h2><img class="plot" alt="{html.escape(t)}" src="{src}">'
                      for t, src in sections)
    false_before = sum(1 for e in events if shift_at is not None and e.at_record <= shift_at)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}}img.plot{{max-width:100%}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Model <b>{html.escape(baseline.model)}</b> ({html.escape(baseline.fingerprint)}); {len(records)} records;
window {baseline.config.window}, stride {baseline.config.stride}; false-alarm budget: one per
{cal.get('target_records_between_false_alarms', float('nan')):,.0f} records
(simulated {cal.get('simulated_records_between_false_alarms') or float('nan'):,.0f}).
{'' if shift_at is None else f'True shift at record {shift_at}; alarms before it: {false_before}.'}</p>
{figures}
<h2>Alarms ({len(events)})</h2><table><tr><th>detector</th><th>record</th><th>{html.escape(xlabel)}</th>
<th>after shift (records)</th><th>statistic</th>
<th>threshold</th><th>moved most</th><th>farthest records (hashed keys)</th></tr>{alarm_rows}</table>
<h2>What moved most at the end of the stream</h2><p>Detectors in alarm, ranked by statistic / threshold;
per detector its largest components (concept, attention head and statistic, principal direction).</p>
<table><tr><th>detector</th><th>component</th><th>contribution</th><th>baseline records farthest that way
(hashed keys)</th></tr>{ranking_rows}</table>
<h2>Concept rates (share above threshold)</h2><table><tr><th>concept</th><th>baseline</th><th>before</th>
<th>after</th><th>probe validity at the end (ratio; above 1: traffic unlike the probe's held-out sources)</th>
</tr>{rate_rows}</table>
{explained}
<p><i>{html.escape(CAVEAT)}</i></p></body></html>"""


def explanation_html(x: dict) -> str:
    """One ``latentwatch explain --json`` result as a section: the components whose ablation moved the
    statistic most, and the strongest interactions (interventional evidence, labelled as such)."""
    e = html.escape
    try:
        def concepts(r: dict) -> str:
            return e(", ".join(f"{k} {float(v):+.3f}" for k, v in r.get("concept_change", {}).items()))

        rows = "".join(f"<tr><td>{e(str(r['component']))}</td><td>{float(r['ratio']):.2f}</td>"
                       f"<td>{float(r['change']):+.2f}</td><td>{concepts(r)}</td></tr>" for r in x["singles"][:10])
        pairs = "".join(f"<li>{e(' + '.join(map(str, p['components'])))}: ratio {float(p['ratio']):.2f}, "
                        f"interaction {float(p['interaction']):+.2f}</li>" for p in x.get("pairs", [])[:5])
        head = (f"{e(str(x['detector']))} on a window of {int(x['window'])} texts: {float(x['ratio']):.2f}x its "
                f"threshold; {e(str(x['ablation']))}-ablated {int(x['components_tried'])} components of layers "
                f"{e(str(x['layers']))}, {int(x['forward_passes'])} forward passes")
        restoring = ", ".join(map(str, x.get("restoring", [])))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ValueError(f"not the JSON output of `latentwatch explain --json`: missing or bad {exc}") from exc
    return (f"<h2>Explanation: {e(str(x['detector']))} (interventional)</h2><p>{head}. "
            f"{'Ablating any one of these brings it under the threshold: ' + e(restoring) + '.' if restoring else ''}"
            f"</p><table><tr><th>component ablated</th><th>statistic / threshold after</th><th>change</th>"
            f"<th>concept score change</th></tr>{rows}</table>"
            + (f"<p>Pairs whose joint effect differs most from the sum of their single effects:</p><ul>{pairs}</ul>"
               if pairs else "") + f"<p><i>{e(str(x.get('caveat', '')))}</i></p>")


def write_report(path: Path, records: Sequence[Record], baseline: Baseline, probes: ProbeSet | None,
                 shift_at: int | None = None, explanations: Sequence[dict] = ()) -> Path:
    path.write_text(build_report(records, baseline, probes, shift_at, explanations=explanations), encoding="utf-8")
    return path
