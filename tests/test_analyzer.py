"""Baselines and the streaming analyzer on records with known distributions."""

from __future__ import annotations

import numpy as np
import pytest

from collectors.record import Record
from monitor.analysis.analyzer import Analyzer
from monitor.analysis.baseline import AnalyzerConfig, Baseline, BaselineError
from monitor.probes.probe import Probe, ProbeSet

D, H = 24, 3
FP = "sha256:" + "cd" * 16


def make_records(n, rng, act_shift=0.0, head_shift=0.0, concept_shift=0.0, fp=FP):
    out = []
    for i in range(n):
        mean = rng.normal(size=D).astype(np.float32) + act_shift
        mean[0] += concept_shift  # the probe below reads dimension 0
        heads = rng.normal(1.0, 0.1, size=(H, 4)).astype(np.float32)
        heads[1, 2] += head_shift  # head 1, mean_distance
        out.append(Record(model="m", fingerprint=fp, key=f"{i:032x}", n_tokens=8, sites={
            "layers.2.resid": {"mean": mean, "last": rng.normal(size=D).astype(np.float32),
                               "norm": np.abs(rng.normal(5, 1, size=2)).astype(np.float32)},
            "layers.2.attn": {"heads": heads}}))
    return out


def probes():
    w0 = np.zeros(D, np.float32)
    w0[0] = 3.0
    w1 = np.zeros(D, np.float32)
    w1[5] = 3.0
    return ProbeSet([Probe("injection", "layers.2.resid", "mean", w0, -4.0, "m", FP),
                     Probe("toxicity", "layers.2.resid", "mean", w1, -4.0, "m", FP)])


CONFIG = AnalyzerConfig(window=100, stride=10, false_alarm_every=2000, pca_components=6)


@pytest.fixture(scope="module")
def baseline():
    return Baseline.build(make_records(3000, np.random.default_rng(0)), probes(), CONFIG)


def test_baseline_round_trip(baseline, tmp_path):
    path = baseline.save(tmp_path / "b.safetensors")
    back = Baseline.load(path)
    assert [s.name for s in back.slots] == [s.name for s in baseline.slots]
    assert [s.threshold for s in back.slots] == [s.threshold for s in baseline.slots]
    assert back.fingerprint == FP and back.config == baseline.config
    x = make_records(100, np.random.default_rng(9))
    a, b = Analyzer(baseline, probes()), Analyzer(back, probes())
    a.update(x)
    b.update(x)
    assert [s.value for s in a.states] == [s.value for s in b.states]
    assert b"pickle" not in path.read_bytes()


def test_corrupt_or_mismatched_baseline_is_refused(baseline, tmp_path):
    path = baseline.save(tmp_path / "b.safetensors")
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # flip a bit in the arrays
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(BaselineError, match="checksum mismatch"):
        Baseline.load(bad)
    bad.write_bytes(b"garbage that is not safetensors")
    with pytest.raises(BaselineError, match="not a readable baseline"):
        Baseline.load(bad)
    other = ProbeSet([Probe("injection", "layers.2.resid", "mean", np.ones(D, np.float32), 0.0, "m", FP)])
    with pytest.raises(BaselineError, match="rebuild the baseline"):
        Analyzer(baseline, other)
    with pytest.raises(BaselineError, match="at least 200"):
        Baseline.build(make_records(150, np.random.default_rng(1)), probes(), CONFIG)


def test_invalid_records_are_counted_and_do_not_poison_state(baseline):
    rng = np.random.default_rng(3)
    clean = make_records(300, rng)
    analyzer = Analyzer(baseline, probes())
    reference = Analyzer(baseline, probes())
    reference.update(clean)
    nan = make_records(5, rng)
    nan[0].sites["layers.2.resid"]["mean"][3] = np.nan
    nan[1].sites["layers.2.attn"]["heads"][0, 0] = np.inf
    nan[2].sites["layers.2.resid"]["mean"] = np.zeros(D + 1, np.float32)
    nan[3].fingerprint = "sha256:another-model"
    del nan[4].sites["layers.2.attn"]
    mixed = clean[:150] + nan + clean[150:]
    analyzer.update(mixed)
    assert dict(analyzer.stats.invalid_total) == {"nonfinite": 2, "shape": 2, "fingerprint": 1}
    assert analyzer.stats.records_total == 305
    assert [s.value for s in analyzer.states] == [s.value for s in reference.states]
    assert all(np.isfinite(s.value) for s in analyzer.states)


def test_no_shift_stream_rarely_alarms_and_shifts_are_attributed(baseline):
    rng = np.random.default_rng(4)
    analyzer = Analyzer(baseline, probes())
    calm = analyzer.update(make_records(4000, rng))
    # budget: one alarm per 2000 records -> expect ~2 in 4000; 8 would be far outside
    assert len(calm) <= 8
    fired = analyzer.update(make_records(300, rng, concept_shift=2.0))
    names = {e.detector for e in fired}
    assert "rate:scores" in names
    rate = next(e for e in fired if e.detector == "rate:scores")
    assert rate.attribution[0][0] == "injection"  # the concept that surged, not the other one
    assert analyzer.concept_rates()["injection"] > analyzer.baseline.info["concept_base_rates"]["injection"]

    analyzer = Analyzer(baseline, probes())
    analyzer.update(make_records(200, rng))
    fired = analyzer.update(make_records(300, rng, head_shift=0.3))
    attn = [e for e in fired if e.detector == "ks:attn:layers.2.attn"]
    assert attn and attn[0].attribution[0][0] == "head 1 mean distance"
    assert "DRIFT ks:attn:layers.2.attn" in attn[0].describe()


def test_memory_is_bounded(baseline):
    analyzer = Analyzer(baseline, probes())
    rng = np.random.default_rng(5)
    batch = make_records(500, rng)
    analyzer.update(batch)
    sizes = [s.buffer.nbytes for s in analyzer.states]
    for _ in range(6):
        analyzer.update(batch)
    assert [s.buffer.nbytes for s in analyzer.states] == sizes
    assert all(s.buffer.shape[0] == CONFIG.window for s in analyzer.states)
    assert analyzer.stats.evaluations_total == (7 * 500 - CONFIG.window) // CONFIG.stride + 1


def test_batch_size_does_not_change_results(baseline):
    rng = np.random.default_rng(6)
    recs = make_records(400, rng, act_shift=0.05) + make_records(300, rng, act_shift=0.6, concept_shift=2.0)

    def summary(events):
        return [(e.detector, e.at_record, round(e.statistic, 9), e.exemplars) for e in events]

    one = Analyzer(baseline, probes(), log_alarms=False)
    one_events = []
    for i, r in enumerate(recs):
        one_events += one.update([r])
        assert one.valid_seen == i + 1  # records waiting for the next evaluation are counted
    many = Analyzer(baseline, probes(), log_alarms=False)
    many_events = many.update(recs[:33]) + many.update(recs[33:])
    assert one_events and summary(one_events) == summary(many_events)
    assert [s.value for s in one.states] == pytest.approx([s.value for s in many.states])
    assert [s.alarms_total for s in one.states] == [s.alarms_total for s in many.states]
    # readers see the records that have not reached an evaluation point yet
    whole = Analyzer(baseline, probes(), log_alarms=False)
    whole.update(recs[:333])  # one batch past the evaluation point at 330: all of it in the windows
    part = Analyzer(baseline, probes(), log_alarms=False)
    part.update(recs[:330])
    part.update(recs[330:333])  # three records waiting for the evaluation at 340
    for (_, mean_a, _), (_, mean_b, _) in zip(part.window_means(), whole.window_means(), strict=True):
        assert mean_a == pytest.approx(mean_b)
    # a checkpoint taken between evaluation points continues exactly
    paused = Analyzer(baseline, probes(), log_alarms=False)
    paused.update(recs[:330])
    paused.update(recs[330:333])  # waiting: not at an evaluation point
    meta, arrays = paused.state_dict()
    resumed = Analyzer(baseline, probes(), log_alarms=False)
    resumed.load_state_dict(meta, arrays)
    assert resumed.valid_seen == 333
    rest = resumed.update(recs[333:])
    assert summary(rest) == summary([e for e in many_events if e.at_record > 333])
    assert [s.value for s in resumed.states] == pytest.approx([s.value for s in many.states])


def _probes_with_validity(rng):
    """The same probes, each carrying a validity reference fit on in-domain records."""
    from monitor.probes.validity import fit_reference

    x = np.stack([r.sites["layers.2.resid"]["mean"] for r in make_records(1200, rng)]).astype(np.float64)
    out = []
    for p in probes().probes:
        p.validity = fit_reference(x[:800], x[800:], p.weights, p.bias, k=4, window=100)
        out.append(p)
    return ProbeSet(out)


def test_probe_validity_flags_a_shift_of_all_traffic_not_a_minority_surge_and_marks_attribution():
    rng = np.random.default_rng(7)
    ps = _probes_with_validity(rng)
    analyzer = Analyzer(Baseline.build(make_records(3000, np.random.default_rng(0)), ps, CONFIG), ps)
    assert np.isnan(analyzer.probe_validity()["injection"][0])  # no window yet
    analyzer.update(make_records(300, rng))
    calm = analyzer.probe_validity()
    assert calm["injection"][0] < 1.0 and calm["toxicity"][0] < 1.0 and not analyzer.out_of_domain()

    # a 20 % surge of real positives: the window-median logit barely moves, the probe stays in domain
    surge = make_records(100, rng)
    for r in surge[:20]:
        r.sites["layers.2.resid"]["mean"][0] += 4.0
    analyzer.update(surge)
    assert analyzer.out_of_domain() == set()

    # all traffic moved along what the injection probe reads (an unfamiliar source): out of domain
    fired = analyzer.update(make_records(300, rng, concept_shift=1.5))
    assert analyzer.out_of_domain() == {"injection"}
    assert analyzer.probe_validity()["injection"][0] > 1.0
    rate = next(e for e in fired if e.detector == "rate:scores")
    assert rate.attribution[0][0] == "injection (probe out of domain)"
    assert all(name != "toxicity (probe out of domain)" for name, _ in rate.attribution)


def test_probes_without_validity_reference_report_none(baseline):
    analyzer = Analyzer(baseline, probes())
    analyzer.update(make_records(200, np.random.default_rng(8)))
    assert analyzer.probe_validity() == {} and analyzer.out_of_domain() == set()


def test_probe_validity_survives_a_checkpoint_round_trip():
    rng = np.random.default_rng(9)
    ps = _probes_with_validity(rng)
    base = Baseline.build(make_records(3000, np.random.default_rng(0)), ps, CONFIG)
    one = Analyzer(base, ps)
    one.update(make_records(150, rng, concept_shift=1.5))
    meta, arrays = one.state_dict()
    two = Analyzer(base, ps)
    two.load_state_dict(meta, arrays)
    assert two.probe_validity() == one.probe_validity() and two.out_of_domain() == {"injection"}


def test_rows_waiting_for_an_evaluation_are_copies_of_the_callers_arrays():
    """Rows wait for the next evaluation point before the detectors transform them: a caller that refills
    one buffer for every record must get what it fed, not the last record stride times."""
    from monitor.analysis.arrays import ArrayMonitor

    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(20), 20)
    ref = rng.normal(size=(400, 6)) + rng.normal(0, 0.3, size=(20, 6))[groups]
    mon = ArrayMonitor(window=10, stride=5, false_alarm_every=300, pca_components=3,
                       max_calibration_evaluations=1000, calibration_alarms=10).fit(ref, groups)
    x = rng.normal(size=(200, 6))
    buf = np.empty(6)
    for row in x:
        buf[:] = row
        mon.update(buf)
    reused = list(mon.statistics.values())
    mon.analyzer_ = Analyzer(mon.baseline_, None, log_alarms=False)
    mon.update(x)
    assert reused == pytest.approx(list(mon.statistics.values()))


def test_a_failing_transform_drops_its_rows_and_does_not_wedge_the_analyzer(baseline, monkeypatch):
    recs = make_records(300, np.random.default_rng(8))
    a = Analyzer(baseline, probes(), log_alarms=False)
    a.update(recs[:200])
    det = a.states[0].slot.detector
    original = det.transform

    def broken(x, cache=None):
        raise FloatingPointError("boom")

    monkeypatch.setattr(det, "transform", broken)
    a.update(recs[200:203])  # waiting for the evaluation at 210: not transformed yet
    with pytest.raises(FloatingPointError):
        a.update(recs[203:210])
    assert a.stats.invalid_total["transform"] == 10 and a.valid_seen == 200
    monkeypatch.setattr(det, "transform", original)
    a.update(recs[210:300])  # carries on
    assert a.valid_seen == 290 and a.stats.evaluations_total > 0
