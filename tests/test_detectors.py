"""Detectors on synthetic data with known answers, and calibration that meets its false-alarm budget."""

from __future__ import annotations

import numpy as np
import pytest

from monitor.analysis import calibration
from monitor.analysis.detectors import (
    MMD,
    PSI,
    ConceptRate,
    KolmogorovSmirnov,
    MeanShift,
    PCAReconstructionError,
    Wasserstein,
)

RNG = np.random.default_rng(42)


def windows(n, w, c, shift=0.0, scale=1.0, rng=RNG):
    return rng.normal(shift, scale, size=(n, w, c))


@pytest.mark.parametrize("cls", [KolmogorovSmirnov, PSI, Wasserstein])
def test_univariate_no_shift_vs_mean_shift(cls):
    det = cls().fit(RNG.normal(size=(4000, 3)))
    calm = det.statistic(windows(200, 200, 3))
    moved = det.statistic(windows(200, 200, 3, shift=np.array([0.0, 0.0, 0.5])))
    # a 0.5-sd shift of one component is separated from every no-shift window
    assert moved.min() > np.quantile(calm, 0.99)
    comps = det.components(windows(1, 200, 3, shift=np.array([0.0, 0.0, 0.5]))[0])
    assert int(np.argmax(comps)) == 2  # attribution names the component that moved


def test_ks_equals_scipy():
    from scipy.stats import ks_2samp

    ref = RNG.normal(size=(3000, 1))
    det = KolmogorovSmirnov().fit(ref)
    for _ in range(20):
        w = RNG.normal(0.2, 1.1, size=(150, 1))
        assert det.statistic(w[None])[0] == pytest.approx(ks_2samp(w[:, 0], ref[:, 0]).statistic, abs=1e-12)


def test_wasserstein_close_to_scipy():
    from scipy.stats import wasserstein_distance

    ref = RNG.normal(size=(5000, 1))
    det = Wasserstein(grid=512).fit(ref)
    w = RNG.normal(0.7, 1.3, size=(2000, 1))
    want = wasserstein_distance(w[:, 0], ref[:, 0]) / ref.std()
    assert det.statistic(w[None])[0] == pytest.approx(want, rel=0.03)


@pytest.mark.parametrize("cls", [MMD, MeanShift, PCAReconstructionError])
def test_multivariate_detectors_see_a_shift_in_activation_space(cls):
    d = 48
    basis = RNG.normal(size=(6, d))
    def draw(n, shift=0.0, noise=0.3):
        return RNG.normal(size=(n, 6)) @ basis + noise * RNG.normal(size=(n, d)) + shift
    det = cls(k=6).fit(draw(4000))
    calm = np.array([det.statistic(det.transform(draw(200))[None])[0] for _ in range(100)])
    if cls is PCAReconstructionError:  # novelty off the baseline subspace
        moved = np.array([det.statistic(det.transform(draw(200, noise=0.45))[None])[0] for _ in range(30)])
    else:  # mean moves along the main direction of variation
        moved = np.array([det.statistic(det.transform(draw(200, shift=0.4 * basis[0]))[None])[0] for _ in range(30)])
    assert moved.min() > np.quantile(calm, 0.99)


def test_concept_rate_detects_a_surge_not_a_drop():
    det = ConceptRate(thresholds=[0.5, 0.5]).fit(np.column_stack([RNG.uniform(size=5000) * 0.6,
                                                                   RNG.uniform(size=5000)]))
    assert det.baseline_rate_[0] == pytest.approx(1 / 6, abs=0.02)
    surge = np.column_stack([RNG.uniform(size=200) * 0.9, RNG.uniform(size=200)])
    drop = np.column_stack([RNG.uniform(size=200) * 0.4, RNG.uniform(size=200)])
    z = det.components(det.transform(surge))
    assert z[0] > 4 and abs(z[1]) < 4
    assert det.statistic(det.transform(drop)[None])[0] < 3


@pytest.mark.parametrize("cls", [KolmogorovSmirnov, PSI, Wasserstein, MMD, MeanShift, PCAReconstructionError])
def test_state_round_trip(cls):
    ref = RNG.normal(size=(1000, 8))
    det = cls(k=4).fit(ref) if cls in (MMD, MeanShift, PCAReconstructionError) else cls().fit(ref[:, :3])
    back = cls.from_state({k: np.asarray(v) for k, v in det.state().items()})
    x = RNG.normal(size=(200, 8 if cls in (MMD, MeanShift, PCAReconstructionError) else 3))
    np.testing.assert_allclose(back.statistic(back.transform(x)[None]), det.statistic(det.transform(x)[None]))


@pytest.mark.parametrize("ert", [400, 1500])
def test_calibration_meets_the_budget_on_fresh_streams(ert):
    """Thresholds from bootstrap streams of a pool give the stated alarm rate on new data (±25 %).

    The pool is 50x the window: a small pool makes calibration conservative (fewer alarms than stated),
    see docs/analyzer.md.
    """
    rng = np.random.default_rng(ert)
    ref, pool = rng.normal(size=(1500, 2)), rng.normal(size=(5000, 2))
    dets = [KolmogorovSmirnov().fit(ref), MeanShift(k=2).fit(ref)]
    window, stride = 100, 10
    sim = calibration.simulate(dets, [d.transform(pool) for d in dets], window=window, stride=stride,
                               evaluations=int(200 * ert / stride), seed=1)
    thresholds, report = calibration.calibrate(sim, ert)
    assert report["simulated_records_between_false_alarms"] == pytest.approx(ert, rel=0.1)
    # fresh streams of the true distribution: count upward crossings over many evaluations
    fresh = calibration.simulate(dets, [d.transform(rng.normal(size=(20000, 2))) for d in dets], window=window,
                                 stride=stride, evaluations=int(200 * ert / stride), seed=2)
    alarms = calibration.count_alarms(fresh.stats > thresholds)
    measured = fresh.stats.shape[0] * fresh.stats.shape[1] * stride / alarms
    assert measured == pytest.approx(ert, rel=0.25)


def test_docstring_examples_of_the_analysis_modules():
    """Every detector's runnable example (river style), the groups and the plain-array entry point."""
    import doctest
    import importlib
    import pkgutil

    import monitor.analysis
    import monitor.analysis.detectors

    names = [f"monitor.analysis.{m.name}" for m in pkgutil.iter_modules(monitor.analysis.__path__)]
    names += [f"monitor.analysis.detectors.{m.name}" for m in pkgutil.iter_modules(monitor.analysis.detectors.__path__)]
    tried = 0
    for name in names:
        result = doctest.testmod(importlib.import_module(name))
        assert result.failed == 0, name
        tried += result.attempted
    assert tried >= 30  # the examples ran (a module whose docstring lost its example would lower this)
