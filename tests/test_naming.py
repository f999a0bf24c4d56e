"""Attribution in names a person knows (issue 18): concept-named principal directions, readable attention
heads, and detectors that attribute each in their own way."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.analysis.analyzer import Analyzer
from monitor.analysis.baseline import AnalyzerConfig, Baseline
from monitor.analysis.detectors import MMD, MeanShift
from tests.test_analyzer import make_records, probes

pytestmark = pytest.mark.slow  # builds several baselines


def _records_with_a_loud_direction(n, rng, shift=0.0):
    recs = make_records(n, rng)
    for r in recs:  # dimension 0 (what the injection probe reads) varies most: it is the top direction
        r.sites["layers.2.resid"]["mean"][0] = rng.normal(0, 4.0) + shift
    return recs


def test_principal_directions_are_named_after_the_concept_they_carry():
    config = AnalyzerConfig(window=50, stride=10, false_alarm_every=2000, pca_components=6)
    base = Baseline.build(_records_with_a_loud_direction(1500, np.random.default_rng(0)), probes(), config)
    slot = next(s for s in base.slots if s.name == "meanshift:layers.2.resid")
    assert slot.components[0].startswith("pc1 (injection ")  # the loud direction carries the injection probe
    assert sum("(" in c for c in slot.components) <= 2  # directions no probe reads keep their number only
    attn = next(s for s in base.slots if s.name == "ks:attn:layers.2.attn")
    assert attn.components[:2] == ["head 0 entropy", "head 0 first token mass"]
    # the names reach alarms, and survive the file
    analyzer = Analyzer(base, probes(), log_alarms=False)
    fired = analyzer.update(_records_with_a_loud_direction(200, np.random.default_rng(1), shift=6.0))
    meanshift = [e for e in fired if e.detector == "meanshift:layers.2.resid"]
    assert meanshift and meanshift[0].attribution[0][0].startswith("pc1 (injection ")


def test_names_round_trip_through_the_baseline_file(tmp_path):
    config = AnalyzerConfig(window=50, stride=10, false_alarm_every=2000, pca_components=6)
    base = Baseline.build(_records_with_a_loud_direction(1500, np.random.default_rng(0)), probes(), config)
    again = Baseline.load(base.save(tmp_path / "b.safetensors"))
    assert [s.components for s in again.slots] == [s.components for s in base.slots]


def test_mmd_attributes_a_widening_that_meanshift_does_not_see():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4000, 16))
    mmd, ms = MMD(k=16).fit(ref), MeanShift(k=16).fit(ref)
    window = rng.normal(size=(200, 16))
    direction = mmd.components_[0]  # widen the reference's first principal direction, mean unchanged
    window += np.outer(rng.normal(0, 2.0, size=200), direction)
    a = mmd.components(mmd.transform(window))
    b = ms.components(ms.transform(window))
    assert int(np.argmax(np.abs(a))) == 0 and abs(a[0]) > 10
    assert abs(b[0]) < 4  # the mean along it did not move: meanshift's attribution does not single it out


def test_alarms_name_the_window_records_farthest_along_the_move():
    config = AnalyzerConfig(window=50, stride=10, false_alarm_every=2000, pca_components=6)
    base = Baseline.build(_records_with_a_loud_direction(1500, np.random.default_rng(0)), probes(), config)
    live = make_records(200, np.random.default_rng(3))
    far = set()
    for i, r in enumerate(live):
        r.key = f"live{i:04d}"
        if i % 10 == 3:  # a few records far out along a direction the baseline varied little in
            r.sites["layers.2.resid"]["mean"][7] += 40.0
            far.add(r.key)
    analyzer = Analyzer(base, probes(), log_alarms=False)
    fired = [e for e in analyzer.update(live) if e.detector == "meanshift:layers.2.resid"]
    assert fired, "the far records should move the window mean"
    assert set(fired[0].exemplars) <= far and len(fired[0].exemplars) == 3
    assert "farthest records: live" in fired[0].describe()
    # plain arrays carry no keys: no exemplars, no error
    from monitor.analysis import signals

    plain = Analyzer(base, probes(), log_alarms=False)
    events = plain.update_signals(signals.extract(live, base.shapes, probes()))
    assert events and all(e.exemplars == [] for e in events)


def test_window_keys_survive_a_checkpoint():
    config = AnalyzerConfig(window=50, stride=10, false_alarm_every=2000, pca_components=6)
    base = Baseline.build(make_records(1500, np.random.default_rng(0)), probes(), config)
    live = make_records(60, np.random.default_rng(4))
    for i, r in enumerate(live):
        r.key = f"k{i}"
    a = Analyzer(base, probes(), log_alarms=False)
    a.update(live)
    meta, arrays = a.state_dict()
    b = Analyzer(base, probes(), log_alarms=False)
    b.load_state_dict(meta, arrays)
    assert list(b._keys) == list(a._keys) and "k59" in set(b._keys)


def test_baseline_keeps_exemplars_along_each_principal_direction(tmp_path):
    config = AnalyzerConfig(window=50, stride=10, false_alarm_every=2000, pca_components=6)
    recs = _records_with_a_loud_direction(1500, np.random.default_rng(0))
    for i, r in enumerate(recs):
        r.key = f"b{i}"
    base = Baseline.build(recs, probes(), config)
    pc1 = base.info["direction_exemplars"]["meanshift:layers.2.resid"]["pc1"]
    values = {r.key: r.sites["layers.2.resid"]["mean"][0] for r in recs}
    top = sorted(values, key=values.get)
    # the loud direction is dimension 0 (up to sign): its extremes are the records with the extreme values
    assert {tuple(pc1["up"]), tuple(pc1["down"])} == {tuple(top[::-1][:3]), tuple(top[:3])}
    assert Baseline.load(base.save(tmp_path / "b.safetensors")).info["direction_exemplars"] == \
        base.info["direction_exemplars"]


def test_rate_exemplars_are_records_that_hit_even_when_most_do():
    config = AnalyzerConfig(window=50, stride=10, false_alarm_every=2000, pca_components=6)
    base = Baseline.build(make_records(1500, np.random.default_rng(0)), probes(), config)
    live = make_records(50, np.random.default_rng(5), concept_shift=8.0)  # nearly every record hits injection
    for i, r in enumerate(live):
        r.key = f"r{i}"
    live[7].sites["layers.2.resid"]["mean"][0] = -9.0  # one that does not
    analyzer = Analyzer(base, probes(), log_alarms=False)
    rate = [e for e in analyzer.update(live) if e.detector == "rate:scores"]
    assert rate and "r7" not in rate[0].exemplars and len(rate[0].exemplars) == 3
