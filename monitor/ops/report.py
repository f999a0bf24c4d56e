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


def build_report(records: Sequence[Record], baseline: Baseline, probes: ProbeSet | None,
                 shift_at: int | None = None, title: str = "latentwatch drift report") -> str:
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
            history.append((analyzer._seen_valid, [st.value for st in analyzer.states]))
    names = [st.slot.name for st in analyzer.states]
    thresholds = [st.slot.threshold for st in analyzer.states]
    split = shift_at if shift_at is not None else len(records) // 2

    sections = []
    # statistic over time, one small panel per detector
    if history:
        x = np.array([h[0] for h in history])
        vals = np.array([h[1] for h in history], dtype=float)
        cols = 3
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(12, 2.4 * rows), squeeze=False)
        for k, name in enumerate(names):
            ax = axes[k // cols][k % cols]
            ax.plot(x, vals[:, k], lw=1.2, color="#1f77b4", label="statistic")
            ax.axhline(thresholds[k], color="#d62728", ls="--", lw=1, label="threshold")
            if shift_at is not None:
                ax.axvline(shift_at, color="#555", ls=":", lw=1)
            ax.set_title(name, fontsize=9)
            ax.tick_params(labelsize=7)
        for k in range(len(names), rows * cols):
            axes[k // cols][k % cols].axis("off")
        fig.tight_layout()
        sections.append(("Drift statistics over the stream (dashed: calibrated threshold"
                         + ("; dotted: shift point" if shift_at is not None else "") + ")", _png(fig)))
    # probe score distributions before / after
    if probes is not None and records:
        valid = [r for r in records if r.fingerprint == baseline.fingerprint]
        scores = probes.score(valid)
        k = len(probes.concepts)
        fig, axes = plt.subplots(1, k, figsize=(3 * k, 2.6), squeeze=False)
        for j, concept in enumerate(probes.concepts):
            ax = axes[0][j]
            bins = np.linspace(0, 1, 21)
            ax.hist(scores[:split, j], bins=bins, alpha=0.6, density=True, label="before")
            ax.hist(scores[split:, j], bins=bins, alpha=0.6, density=True, label="after")
            ax.set_title(concept, fontsize=9)
            ax.tick_params(labelsize=7)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        label = "the shift" if shift_at is not None else "the middle of the stream"
        sections.append((f"Probe score distributions before and after {label}", _png(fig)))

    def moved(e) -> str:
        return html.escape(", ".join(f"{n} {v:+.3g}" for n, v in e.attribution[:4]))

    alarm_rows = "".join(
        f"<tr><td>{html.escape(e.detector)}</td><td>{e.at_record}</td>"
        f"<td>{'' if shift_at is None else e.at_record - shift_at}</td><td>{e.statistic:.4g}</td>"
        f"<td>{e.threshold:.4g}</td><td>{moved(e)}</td></tr>"
        for e in events)
    rate_rows = ""
    if probes is not None:
        base_rates = baseline.info.get("concept_base_rates", {})
        hit = probes.above(scores)
        for j, c in enumerate(probes.concepts):
            before = float(hit[:split, j].mean()) if split else float("nan")
            after = float(hit[split:, j].mean()) if len(scores) > split else float("nan")
            rate_rows += (f"<tr><td>{html.escape(c)}</td><td>{base_rates.get(c, float('nan')):.3f}</td>"
                          f"<td>{before:.3f}</td><td>{after:.3f}</td></tr>")
    ranking_rows = "".join(f"<tr><td>{html.escape(d)}</td><td>{html.escape(c)}</td><td>{v:+.3g}</td></tr>"
                           for d, c, v in analyzer.ranking(top=12))
    cal = baseline.info.get("calibration", {})
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
<h2>Alarms ({len(events)})</h2><table><tr><th>detector</th><th>record</th><th>after shift</th><th>statistic</th>
<th>threshold</th><th>moved most</th></tr>{alarm_rows}</table>
<h2>What moved most at the end of the stream</h2><p>Detectors in alarm, ranked by statistic / threshold;
per detector its largest components (concept, attention head and statistic, principal direction).</p>
<table><tr><th>detector</th><th>component</th><th>contribution</th></tr>{ranking_rows}</table>
<h2>Concept rates (share above threshold)</h2><table><tr><th>concept</th><th>baseline</th><th>before</th>
<th>after</th></tr>{rate_rows}</table>
<p><i>{html.escape(CAVEAT)}</i></p></body></html>"""


def write_report(path: Path, records: Sequence[Record], baseline: Baseline, probes: ProbeSet | None,
                 shift_at: int | None = None) -> Path:
    path.write_text(build_report(records, baseline, probes, shift_at), encoding="utf-8")
    return path
