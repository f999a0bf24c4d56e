"""The HTML report: a time axis when the records carry a clock, alarms listed with their time."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.ops.report import build_report, time_axis
from tests.test_analyzer import CONFIG, make_records, probes

pytestmark = pytest.mark.slow  # builds a baseline and renders plots


def test_time_axis_picks_a_unit_and_falls_back_to_record_numbers():
    x, label = time_axis(np.array([100.0, 130.0, 160.0]))
    assert label == "time since first record (s)" and x.tolist() == [0.0, 30.0, 60.0]
    x, label = time_axis(np.array([0.0, 600.0, 1800.0]))
    assert label == "time since first record (min)" and x.tolist() == [0.0, 10.0, 30.0]
    x, label = time_axis(np.array([0.0, 36_000.0]))
    assert label == "time since first record (h)" and x.tolist() == [0.0, 10.0]
    for clockless in ([5.0, 5.0, 5.0], [3.0, 1.0, 2.0], [0.0, float("nan")]):
        x, label = time_axis(np.array(clockless))
        assert label == "record number" and x.tolist() == list(range(1, len(clockless) + 1))


@pytest.fixture(scope="module")
def baseline():
    from monitor.analysis.baseline import Baseline

    return Baseline.build(make_records(2000, np.random.default_rng(0)), probes(), CONFIG)


def test_report_lists_alarms_after_a_shift_with_their_time(baseline):
    rng = np.random.default_rng(5)
    live = make_records(300, rng) + make_records(300, rng, concept_shift=3.0)
    for i, rec in enumerate(live):
        rec.ts = 1_000_000.0 + 2.0 * i  # one record every 2 s: 20 minutes in all
    page = build_report(live, baseline, probes(), shift_at=300)
    assert "time since first record (min)" in page
    rows = page.split("<h2>Alarms (")[1].split("</table>")[0]
    n_alarms = int(page.split("<h2>Alarms (")[1].split(")")[0])
    assert n_alarms >= 1 and rows.count("<tr><td>") == n_alarms
    assert "True shift at record 300; alarms before it: 0." in page
    assert page.count('<img class="plot"') == 3  # statistics, concept hit share over time, score histograms


def test_report_includes_explanations_and_refuses_malformed_ones(baseline):
    rng = np.random.default_rng(6)
    live = make_records(120, rng) + make_records(120, rng, act_shift=1.0)
    explanation = {"detector": "meanshift:layers.2.resid", "window": 100, "ratio": 3.1, "ablation": "zero",
                   "components_tried": 2, "layers": [1, 2], "forward_passes": 300,
                   "restoring": ["layers.2.attn head 1"],
                   "singles": [{"component": "layers.2.attn head 1", "ratio": 0.8, "change": -2.3,
                                "concept_change": {"injection": -0.1}},
                               {"component": "<b>layers.2.mlp</b>", "ratio": 3.0, "change": -0.1,
                                "concept_change": {}}],
                   "pairs": [], "caveat": "interventional"}
    page = build_report(live, baseline, probes(), shift_at=120, explanations=[explanation])
    section = page.split("<h2>Explanation: meanshift:layers.2.resid (interventional)</h2>")[1]
    assert "layers.2.attn head 1" in section and "injection -0.100" in section
    assert "<b>layers.2.mlp" not in section and "&lt;b&gt;layers.2.mlp" in section
    assert "brings it under the threshold: layers.2.attn head 1" in section
    with pytest.raises(ValueError, match="explain --json"):
        build_report(live, baseline, probes(), explanations=[{"detector": "x"}])
