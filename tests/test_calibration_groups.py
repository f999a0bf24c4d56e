"""Group-aware calibration: the budget holds on traffic from groups the baseline never saw.

The synthetic streams have the structure real traffic has: records come in groups (documents,
sessions, tenants, hours) and every group carries its own offset. The tests show the mechanism:
with ``group_by`` the observed false-alarm rate on new groups is near the budget, and with
``group_by: record`` (resampling the baseline's own records, the old design) it is several times it.
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from collectors.record import Record
from monitor.analysis import calibration
from monitor.analysis.analyzer import Analyzer
from monitor.analysis.arrays import ArrayMonitor
from monitor.analysis.baseline import AnalyzerConfig, Baseline, BaselineError
from monitor.analysis.detectors import ConceptRate, FullMeanShift, MeanShift, NearestNeighbourNovelty
from monitor.analysis.detectors.pca_error import PCAReconstructionError

D = 64


def grouped(rng: np.random.Generator, n_groups: int, per: int, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """``n_groups`` groups of ``per`` records in ``D`` dims; each group offset ~ N(0, spread²) per dim."""
    offsets = rng.normal(0, spread, size=(n_groups, D))
    g = np.repeat(np.arange(n_groups), per)
    return rng.normal(size=(n_groups * per, D)) + offsets[g], g


def false_alarm_ratio(monitor: ArrayMonitor, rng: np.random.Generator, streams: int, ert: float) -> float:
    """Observed false alarms / budgeted ones on no-shift streams of 10 new groups each (groups in sequence)."""
    alarms = fed = 0
    for _ in range(streams):
        monitor.analyzer_ = Analyzer(monitor.baseline_, None, log_alarms=False)
        x, _ = grouped(rng, 10, 40)
        alarms += len(monitor.update(x))
        fed += len(x)
    return alarms / (fed / ert)


@pytest.mark.slow
def test_grouped_calibration_holds_the_budget_on_new_groups_and_record_resampling_does_not():
    ert = 500
    with threadpool_limits(1):
        rng = np.random.default_rng(3)
        x, g = grouped(rng, 40, 40)
        by_group = ArrayMonitor(window=20, stride=5, false_alarm_every=ert, pca_components=8).fit(x, g)
        by_record = ArrayMonitor(window=20, stride=5, false_alarm_every=ert, pca_components=8).fit(x)
        grouped_ratio = false_alarm_ratio(by_group, np.random.default_rng(100), 120, ert)
        record_ratio = false_alarm_ratio(by_record, np.random.default_rng(100), 120, ert)
    assert 0.3 <= grouped_ratio <= 1.5, grouped_ratio
    assert record_ratio > 3, record_ratio
    design = by_group.baseline_.info["calibration_design"]
    assert design["folds"] == 4 and design["groups"] == 40
    assert sum(f["groups"] for f in design["per_fold"]) == 40
    assert all(f["pseudo_groups"] > 0 for f in design["per_fold"])
    assert any("group_by record" in w for w in by_record.warnings)


def test_pca_error_one_extreme_record_moves_a_window_by_a_bounded_amount():
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(4, 32))
    ref = rng.normal(size=(4000, 4)) @ basis + 0.1 * rng.normal(size=(4000, 32))
    det = PCAReconstructionError(k=4).fit(ref)
    window = rng.normal(size=(50, 4)) @ basis + 0.1 * rng.normal(size=(50, 32))
    extreme = window.copy()
    extreme[7] += 40.0 * rng.normal(size=32)  # far off the subspace: ~10^5 times the usual residual
    before = det.statistic(det.transform(window)[None])[0]
    after = det.statistic(det.transform(extreme)[None])[0]
    assert 0 < after - before <= det.max_step(50) + 1e-9
    assert det.max_step(50) < 2.0  # one record cannot page anyone (thresholds sit at several units)
    # unclipped, the same record would have moved the statistic by orders of magnitude more
    raw = det._residual(extreme[7:8])[0] / det.scale_
    assert raw / (det.sigma_ * np.sqrt(50)) > 100 * det.max_step(50)


def test_pca_error_moments_are_out_of_sample():
    """In-sample residuals are smaller than fresh ones; moments from the other half are not."""
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(600, 40)) * np.linspace(2, 0.5, 40)
    det = PCAReconstructionError(k=16).fit(ref)
    fresh = rng.normal(size=(20000, 40)) * np.linspace(2, 0.5, 40)
    z = det.statistic(det.transform(fresh).reshape(100, 200, 1))
    assert abs(float(np.mean(z))) < 1.5  # centred on fresh data (in-sample moments put it at several units)


def out_of_subspace_shift(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    scales = np.concatenate([np.linspace(6, 3, 16), np.full(D - 16, 0.5)])
    ref = rng.normal(size=(4000, D)) * scales
    shift = np.zeros(D)
    shift[16:] = 0.12  # only directions outside the top 16
    return ref, scales, shift


def test_full_dimension_mean_shift_sees_a_shift_outside_the_top_components():
    rng = np.random.default_rng(2)
    ref, scales, shift = out_of_subspace_shift(rng)
    inv_var = 1 / scales**2
    assert (shift**2 * inv_var)[16:].sum() / (shift**2 * inv_var).sum() > 0.997  # Mahalanobis mass outside
    dets = [FullMeanShift(k=16).fit(ref), MeanShift(k=16).fit(ref)]
    pool = rng.normal(size=(20000, D)) * scales
    sim = calibration.simulate(dets, [d.transform(pool) for d in dets], window=200, stride=50, evaluations=4000)
    thresholds, _ = calibration.calibrate(sim, 20_000)
    moved = rng.normal(size=(200, D)) * scales + shift
    full, top = (d.statistic(d.transform(moved)[None])[0] for d in dets)
    assert full > thresholds[0]  # seen
    assert top < thresholds[1]  # the top-16 test is blind to it
    names = dets[0].component_names()
    assert names[int(np.argmax(dets[0].components(dets[0].transform(moved))))] == "outside_top16"


def test_novelty_has_power_on_a_ten_percent_mixture():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=(4000, 32))
    dets = [NearestNeighbourNovelty(k=8).fit(ref), MeanShift(k=8).fit(ref)]
    pool = rng.normal(size=(20000, 32))
    sim = calibration.simulate(dets, [d.transform(pool) for d in dets], window=100, stride=10, evaluations=6000)
    thresholds, _ = calibration.calibrate(sim, 5000)
    far = rng.normal(size=(32,))
    far *= 10.0 / np.linalg.norm(far)  # new kinds of record, 10 sd away on either side: the mean does not move
    sign = rng.choice([-1.0, 1.0], size=(100, 1))
    mixed = rng.normal(size=(100, 32)) + np.where(rng.random((100, 1)) < 0.1, sign * far, 0.0)
    novelty, mean = (d.statistic(d.transform(mixed)[None])[0] for d in dets)
    assert novelty > thresholds[0]
    assert mean < thresholds[1]  # the mean-based test is blind to it


def test_binomial_concept_rate_sees_a_doubling_at_the_default_window():
    rng = np.random.default_rng(5)
    det = ConceptRate(thresholds=[0.5, 0.5]).fit(np.stack([rng.random(20000) < 0.05,
                                                           rng.random(20000) < 0.005], axis=1) * 0.9)
    pool = np.stack([rng.random(40000) < 0.05, rng.random(40000) < 0.005], axis=1) * 0.9
    sim = calibration.simulate([det], [det.transform(pool)], window=200, stride=50, evaluations=40_000)
    (threshold,), _ = calibration.calibrate(sim, 20_000)
    caught = 0
    for _ in range(50):
        doubled = np.stack([rng.random(200) < 0.10, rng.random(200) < 0.005], axis=1) * 0.9
        caught += det.statistic(det.transform(doubled)[None])[0] > threshold
    assert caught >= 25  # a doubling of a 5 % concept is seen in most windows of 200 at 1 per 20,000
    assert det.components(det.transform(doubled))[0] > det.components(det.transform(doubled))[1]


def records(n: int, rng: np.random.Generator, meta=None, ts=None) -> list[Record]:
    return [Record(model="m", fingerprint="sha256:" + "ef" * 16, key=f"{i:032x}", n_tokens=8,
                   ts=0.0 if ts is None else ts(i), meta={} if meta is None else meta(i),
                   sites={"layers.1.resid": {"mean": rng.normal(size=8).astype(np.float32),
                                             "last": rng.normal(size=8).astype(np.float32),
                                             "norm": np.abs(rng.normal(5, 1, size=2)).astype(np.float32)}})
            for i in range(n)]


def test_group_by_errors_and_warnings_name_the_numbers():
    rng = np.random.default_rng(6)
    cfg = {"window": 20, "stride": 5, "false_alarm_every": 500, "pca_components": 4}
    few = records(400, rng, meta=lambda i: {"tenant": str(i % 6)})
    with pytest.raises(BaselineError, match=r"6 groups by meta:tenant.*at least 8"):
        Baseline.build(few, None, AnalyzerConfig(group_by="meta:tenant", **cfg))
    with pytest.raises(BaselineError, match="400 of 400 records have no metadata key 'doc'"):
        Baseline.build(few, None, AnalyzerConfig(group_by="meta:doc", **cfg))
    hourly = records(600, rng, ts=lambda i: 3600.0 * 500_000 + 60.0 * i)  # 10 hours
    base = Baseline.build(hourly, None, AnalyzerConfig(group_by="ts:3600", **cfg))
    assert base.info["groups"] == 10 and base.config.group_by == "ts:3600"
    assert any("10 groups by ts:3600" in w and "at least 20" in w for w in base.info["warnings"])
    with pytest.raises(ValueError, match="group_by"):
        AnalyzerConfig(group_by="tenant")


def test_unreachable_budget_is_warned_with_numbers():
    rng = np.random.default_rng(7)
    recs = records(600, rng, meta=lambda i: {"doc": str(i // 20)})
    base = Baseline.build(recs, None, AnalyzerConfig(window=50, stride=10, false_alarm_every=10_000_000,
                                                     max_calibration_evaluations=2000, group_by="meta:doc",
                                                     pca_components=4))
    text = " ".join(base.info["warnings"])
    assert "beyond what 2,000 simulated evaluations resolve" in text
    assert "windows' worth of reference records in 30 groups" in text


def test_group_count_warning_needs_groups_that_fill_a_window_and_a_budget_beyond_them():
    rng = np.random.default_rng(8)
    recs = records(600, rng, meta=lambda i: {"doc": str(i // 20)})  # 30 groups of 20 records
    def warnings(**cfg) -> str:
        config = AnalyzerConfig(stride=10, max_calibration_evaluations=2000, group_by="meta:doc", pca_components=4,
                                **cfg)
        return " ".join(Baseline.build(recs, None, config).info["warnings"])

    def warned(**cfg) -> bool:
        return "expected to lie beyond all of them" in warnings(**cfg)

    assert warned(window=30, false_alarm_every=621)       # just beyond (30 + 1) x 20 = 620 records
    text = warnings(window=30, false_alarm_every=10_000)
    assert "one per 500 groups of ~20 records" in text and "Record at least 500 distinct doc values" in text
    assert "loosen the budget to one false alarm per 620 records at most" in text and "16.1x" in text
    assert not warned(window=30, false_alarm_every=620)   # the loosened budget the warning proposes
    assert not warned(window=50, false_alarm_every=5000)  # groups of 20 fill less than half a window of 50


def test_a_version_1_baseline_is_refused_with_a_clear_message(tmp_path):
    from safetensors.numpy import save_file

    from monitor.analysis.baseline import _digest

    meta = json.dumps({"format": "latentwatch-baseline", "version": 1})
    arrays = {"0/x": np.zeros(2)}
    save_file(arrays, str(tmp_path / "old.safetensors"),
              metadata={"latentwatch": meta, "sha256": _digest(meta, arrays)})
    with pytest.raises(BaselineError, match=r"v1, this build reads v2, v3.*without groups.*latentwatch baseline build"):
        Baseline.load(tmp_path / "old.safetensors")


def test_a_version_2_baseline_loads_as_one_group_at_a_time(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file, save_file

    from monitor.analysis.baseline import _digest

    rng = np.random.default_rng(1)
    x, g = grouped(rng, 12, 20)
    mon = ArrayMonitor(window=20, stride=5, false_alarm_every=500, detectors=["meanshift"]).fit(x, g)
    path = mon.baseline_.save(tmp_path / "v3.safetensors")
    with safe_open(str(path), "np") as f:
        meta = json.loads(f.metadata()["latentwatch"])
    arrays = load_file(str(path))
    meta["version"] = 2
    del meta["config"]["concurrent_groups"]  # what a v2 build wrote
    text = json.dumps(meta, sort_keys=True)
    save_file(arrays, str(tmp_path / "v2.safetensors"), metadata={"latentwatch": text, "sha256": _digest(text, arrays)})
    old = Baseline.load(tmp_path / "v2.safetensors")
    assert old.config.concurrent_groups == 1
    assert [s.threshold for s in old.slots] == [s.threshold for s in mon.baseline_.slots]


def test_array_monitor_refuses_bad_input():
    rng = np.random.default_rng(8)
    x, g = grouped(rng, 12, 30)
    mon = ArrayMonitor(window=20, stride=5, false_alarm_every=500, pca_components=4).fit(x, g)
    with pytest.raises(ValueError, match="64 columns"):
        mon.update(np.zeros((5, 10)))
    with pytest.raises(ValueError, match="one label per reference row"):
        ArrayMonitor(window=20, stride=5).fit(x, g[:-1])
    with pytest.raises(ValueError, match="finite"):
        ArrayMonitor(window=20, stride=5).fit(np.full((100, 3), np.nan))
    bad = np.zeros((3, 64))
    bad[1, 0] = np.inf
    mon.update(bad)  # a non-finite row is counted and skipped, never mixed into the state
    assert mon.analyzer_.stats.invalid_total["nonfinite"] == 1



def test_concept_rate_null_widens_for_a_clustered_concept_so_another_concepts_surge_is_seen():
    """Concept 0 comes in whole groups (a topic); concept 1 is scattered. Calibrated on groups, the
    binomial null lets concept 0's ordinary bursts set the threshold and hides a surge of concept 1;
    the beta-binomial null of a clustered concept does not."""
    from monitor.analysis.detectors import ConceptRate

    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(80), 10)
    topical = np.isin(groups, rng.choice(80, size=10, replace=False))
    hits = np.stack([topical & (rng.random(len(groups)) < 0.8), rng.random(len(groups)) < 0.03], axis=1)
    scores = np.where(hits, 0.9, 0.1)
    surge = np.stack([np.zeros(30, bool), rng.random(30) < 0.35], axis=1)  # concept 1 at ~12x its share

    found = {}
    for name, fit_groups in (("beta-binomial", groups), ("binomial", None)):
        det = ConceptRate(thresholds=[0.5, 0.5]).fit(scores, fit_groups)
        sim = calibration.simulate([det], [det.transform(scores)], window=30, stride=5, evaluations=20_000,
                                   seed=1, groups=groups)
        (threshold,), _ = calibration.calibrate(sim, 5000)
        found[name] = det.statistic(det.transform(np.where(surge, 0.9, 0.1))[None])[0] > threshold
    assert det.icc_.tolist() == [0.0, 0.0]  # the last fit had no groups
    assert found == {"beta-binomial": True, "binomial": False}


def test_beta_binomial_tail_stays_finite_and_ordered_far_in_the_tail():
    from monitor.analysis.detectors import ConceptRate

    det = ConceptRate(thresholds=[0.5, 0.5]).fit(np.full((100, 2), 0.1))
    det.rate_, det.icc_, det._tables = np.array([0.01, 0.01]), np.array([1e-3, 1e-5]), {}
    table = det._table(200)
    assert np.isfinite(table).all() and (np.diff(table, axis=0) >= -1e-9).all()
    assert table[-1, 0] > 100  # 200 hits of a 1 % concept: far beyond any budget, not capped near 16
    binomial = ConceptRate(thresholds=[0.5]).fit(np.full((100, 1), 0.1))
    binomial.rate_, binomial._tables = np.array([0.01]), {}
    np.testing.assert_allclose(table[:, 1], binomial._table(200)[:, 0])  # below MIN_ICC: the binomial
    assert table[24, 0] < table[24, 1]  # clustering widens the null
    side = ConceptRate(thresholds=[0.5, 0.5], concurrent_groups=8).fit(np.full((100, 2), 0.1))
    side.rate_, side.icc_, side._tables = det.rate_, det.icc_, {}
    assert table[24, 0] < side._table(200)[24, 0] < table[24, 1]  # 8 sessions per window: narrower, not binomial
    crowd = ConceptRate(thresholds=[0.5], concurrent_groups=1000).fit(np.full((100, 1), 0.1))
    crowd.rate_, crowd.icc_, crowd._tables = np.array([0.01]), np.array([1e-3]), {}
    np.testing.assert_allclose(crowd._table(200)[:, 0], binomial._table(200)[:, 0])  # rho / C below MIN_ICC
    restored = ConceptRate.from_state(side.state())
    assert restored.concurrent_groups == 8


def test_simulated_streams_say_which_pool_rows_they_read_whole_groups_in_order():
    rng = np.random.default_rng(5)
    x, g = grouped(rng, 12, 7)
    det = MeanShift(k=4).fit(x)
    sim = calibration.simulate([det], [det.transform(x)], window=10, stride=5, evaluations=600, groups=g)
    assert sim.rows.shape == (sim.stats.shape[0], 10 + (sim.stats.shape[1] - 1) * 5)
    for stream in sim.rows:
        # inside a stream, a group's rows come together and in recorded order (the first and last may be cut)
        changes = np.flatnonzero(np.diff(g[stream])) + 1
        for a, b in itertools.pairwise(changes):
            assert np.array_equal(stream[a:b], np.flatnonzero(g == g[stream[a]]))
    # the statistic at evaluation e is the one of the window those rows form
    e = 3
    rows = sim.rows[0, e * 5 : e * 5 + 10]
    np.testing.assert_allclose(sim.stats[0, e, 0], det.statistic(det.transform(x)[rows][None])[0], rtol=1e-9)


def test_grouped_streams_never_repeat_a_group_back_to_back():
    rng = np.random.default_rng(0)
    runs = [np.arange(0, 3), np.arange(3, 6)]  # two groups: without the rule, each pass boundary repeats half the time
    idx = calibration._grouped_stream(rng, runs, 600)
    edges = np.flatnonzero(np.diff((idx >= 3).astype(int))) + 1
    lengths = np.diff(edges)  # the blocks between the first and the last, which may be cut
    assert len(lengths) > 150 and np.all(lengths == 3)  # a repeated group would make a block of 6
    one = calibration._grouped_stream(rng, [np.arange(4)], 40)  # a single group can only follow itself: it ends
    assert len(one) == 40


def test_interleaved_streams_hold_about_concurrent_groups_per_window_each_in_order():
    rng = np.random.default_rng(2)
    runs = [np.arange(40 * i, 40 * (i + 1)) for i in range(30)]
    idx = calibration._interleaved_stream(rng, runs, 3000, concurrent=6)
    group = idx // 40
    per_window = [len(np.unique(group[s : s + 30])) for s in range(0, 2970, 5)]
    assert 5.5 <= np.mean(per_window) <= 7.5  # about min(window, concurrent) = 6, plus a group ending inside
    sequential = calibration._grouped_stream(rng, runs, 3000) // 40
    assert np.mean([len(np.unique(sequential[s : s + 30])) for s in range(0, 2970, 5)]) < 2
    steps = np.concatenate([np.diff(idx[group == g]) for g in np.unique(group)])
    assert (steps == 1).mean() > 0.8  # a group's records come in recorded order (a visit restarts it now and then)


def interleave(rng: np.random.Generator, x: np.ndarray, g: np.ndarray, concurrent: int) -> np.ndarray:
    """Rows of ``x`` as ``concurrent`` groups served side by side: each next record from a random open group."""
    queues = [list(np.flatnonzero(g == k)) for k in np.unique(g)]
    rng.shuffle(queues)
    active, out = queues[:concurrent], []
    waiting = queues[concurrent:]
    while active:
        i = int(rng.integers(len(active)))
        out.append(active[i].pop(0))
        if not active[i]:
            active.pop(i)
            if waiting:
                active.append(waiting.pop())
    return x[np.array(out)]


@pytest.mark.slow
def test_concurrent_groups_calibrate_for_sessions_served_side_by_side():
    """Live traffic of 8 sessions at a time: calibrated for it, the budget holds; calibrated as if sessions
    came one after another, thresholds sit far above what such windows reach (alarms well under budget,
    and a real shift is seen later)."""
    ert = 500
    with threadpool_limits(1):
        rng = np.random.default_rng(4)
        x, g = grouped(rng, 40, 40, spread=0.5)
        side = ArrayMonitor(window=20, stride=5, false_alarm_every=ert, pca_components=8,
                            detectors=["meanshift"], concurrent_groups=8).fit(x, g)
        serial = ArrayMonitor(window=20, stride=5, false_alarm_every=ert, pca_components=8,
                              detectors=["meanshift"]).fit(x, g)
        top = np.linalg.svd(x - x.mean(0), full_matrices=False)[2][:3]
        ratios, delays = {}, {}
        for name, mon in (("side", side), ("serial", serial)):
            live_rng = np.random.default_rng(200)
            alarms = fed = 0
            for _ in range(60):
                mon.analyzer_ = Analyzer(mon.baseline_, None, log_alarms=False)
                y, gy = grouped(live_rng, 16, 40, spread=0.5)
                alarms += len(mon.update(interleave(live_rng, y, gy, 8)))
                fed += len(y)
            ratios[name] = alarms / (fed / ert)
            found = []
            for k in range(5):  # along the top 3 directions, as big as a group offset is along them
                mon.analyzer_ = Analyzer(mon.baseline_, None, log_alarms=False)
                y, gy = grouped(np.random.default_rng(70 + k), 16, 40, spread=0.5)
                events = mon.update(interleave(np.random.default_rng(80 + k), y + 0.5 * top.sum(0), gy, 8))
                found.append(min((e.at_record for e in events), default=len(y) + 1))
            delays[name] = float(np.median(found))
    assert 0.3 <= ratios["side"] <= 1.5, ratios
    assert ratios["serial"] < 0.3, ratios
    assert delays["side"] < delays["serial"] / 2, delays


def test_pseudo_group_means_vary_like_real_groups_of_their_size():
    """tau² = σ² = 1: a real group of n records has a mean that varies by 1 + 1/n; so must a pseudo-group's
    (removing only the shrunken effect left too little: 1.5 instead of 2 for single records)."""
    rng = np.random.default_rng(9)
    sizes = np.array([1] * 300 + [2] * 300 + [20] * 60)
    g = np.repeat(np.arange(len(sizes)), sizes)
    x = rng.normal(size=(len(g), 4)) + rng.normal(size=(len(sizes), 4))[g]
    pseudo, ids = calibration.pseudo_groups({"act:x": x}, g, 3000, np.random.default_rng(2))
    p, n = pseudo["act:x"], np.bincount(ids)
    means = np.stack([p[ids == k].mean(0) for k in range(len(n))])
    for size in (1, 2, 20):
        observed = means[n == size].var(axis=0).mean()
        assert abs(observed / (1 + 1 / size) - 1) < 0.15, (size, observed)


def test_pseudo_groups_keep_single_records_variation_and_the_held_out_centre():
    """Many one-record groups beside a few large ones: a pseudo-group made from a single record keeps that
    record's own deviation (removing its mean erased it), and pseudo-records sit where the held-out records
    do, wherever the detectors' fit was centred."""
    rng = np.random.default_rng(6)
    big = np.repeat(np.arange(5), 40)
    g = np.concatenate([big, np.arange(5, 205)])
    x = rng.normal(size=(len(g), 8)) + rng.normal(0, 0.3, size=(205, 8))[g] + 100.0  # the fold sits at 100
    pseudo, ids = calibration.pseudo_groups({"act:x": x}, g, 400, np.random.default_rng(1))
    p = pseudo["act:x"]
    assert np.allclose(p.mean(0), 100.0, atol=0.3)
    sizes = np.bincount(ids)
    single = p[np.isin(ids, np.flatnonzero(sizes == 1))]
    assert len(single) > 100
    assert 0.7 < single.var(0).mean() / x.var(0).mean() < 1.3
