"""Set detector thresholds from a false-alarm budget by resampling the baseline.

The operator states the expected run time between false alarms of the *whole monitor* (ERT, in
sampled records; or per day at a stated sampled traffic rate). Every detector evaluates a sliding
window of ``window`` records every ``stride`` records, so consecutive evaluations are strongly
correlated and a per-evaluation p-value says little about how often the monitor pages. Following
Cobb, Van Looveren & Klaise (AISTATS 2022), thresholds are instead set on simulated no-drift
streams:

1. Streams are drawn by bootstrap from the baseline's *calibration pool*, records the detectors'
   reference never saw (the same records for all detectors, so their correlation is kept).
2. Every detector's statistic is computed along every stream, at every evaluation.
3. For a common level ``alpha``, each detector's threshold is the ``1 − alpha`` quantile of its
   simulated statistics.
4. An alarm is what pages someone: a detector's statistic *crossing* its threshold from below (it
   then stays firing until it drops back, as the analyzer and the Prometheus alert do). ``alpha`` is
   searched so that the simulated alarms of all detectors together come once per ``ERT`` records:
   ``alarms / evaluations = stride / ERT``.

The report gives the number of simulated alarms the estimate rests on; its relative standard error
is about ``1/sqrt(alarms)``.

Reference: Cobb, Van Looveren, Klaise, "Sequential multivariate change detection with calibrated and
memoryless false detection rates", AISTATS 2022.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Simulation:
    stats: np.ndarray  # [streams, evals, detectors]
    window: int
    stride: int


def simulate(detectors: list[Any], pools: list[np.ndarray], *, window: int, stride: int, evaluations: int,
             seed: int = 0, streams: int | None = None, chunk: int = 256) -> Simulation:
    """Statistics of every detector on bootstrap streams drawn from ``pools`` (transformed, aligned rows)."""
    n_pool = pools[0].shape[0]
    if any(p.shape[0] != n_pool for p in pools):
        raise ValueError("calibration pools must have one row per record for every detector")
    rng = np.random.default_rng(seed)
    streams = streams or max(4, evaluations // 1500)
    per_stream = max(1, evaluations // streams)
    length = window + (per_stream - 1) * stride
    stats = np.empty((streams, per_stream, len(detectors)))
    starts = np.arange(per_stream) * stride
    for s in range(streams):
        idx = rng.integers(0, n_pool, size=length)
        for d, (det, pool) in enumerate(zip(detectors, pools, strict=True)):
            x = pool[idx]
            if hasattr(det, "statistic_from_mean"):
                cs = np.concatenate([np.zeros((1, x.shape[1])), np.cumsum(x, axis=0)])
                means = (cs[starts + window] - cs[starts]) / window
                stats[s, :, d] = det.statistic_from_mean(means, window)
            else:
                for a in range(0, per_stream, chunk):
                    st = starts[a : a + chunk]
                    wins = x[st[:, None] + np.arange(window)[None, :]]  # [chunk, W, c]
                    stats[s, a : a + len(st), d] = det.statistic(wins)
    return Simulation(stats, window, stride)


def count_alarms(exceed: np.ndarray) -> int:
    """Upward crossings in ``exceed`` ``[streams, evals, detectors]`` (an exceedance at the first evaluation counts)."""
    starts = exceed.copy()
    starts[:, 1:] &= ~exceed[:, :-1]
    return int(starts.sum())


def thresholds_at(sim: Simulation, alpha: float) -> np.ndarray:
    flat = sim.stats.reshape(-1, sim.stats.shape[2])
    return np.quantile(flat, 1 - alpha, axis=0, method="higher")


def calibrate(sim: Simulation, ert: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Thresholds ``[detectors]`` giving the monitor an expected ``ert`` records between false alarms."""
    target = sim.stride / ert
    lo, hi = 1e-9, 0.5
    best = None
    for _ in range(50):
        alpha = math.sqrt(lo * hi)
        th = thresholds_at(sim, alpha)
        alarms = count_alarms(sim.stats > th)
        hazard = alarms / (sim.stats.shape[0] * sim.stats.shape[1])
        best = (alpha, th, alarms, hazard)
        if hazard > target:
            hi = alpha
        else:
            lo = alpha
        if hi / lo < 1.0005:
            break
    assert best is not None
    alpha, th, alarms, hazard = best
    report = {
        "target_records_between_false_alarms": ert,
        "simulated_records_between_false_alarms": round(float(sim.stride / hazard), 1) if hazard else None,
        "simulated_alarms": int(alarms),
        "relative_standard_error": round(1 / math.sqrt(alarms), 3) if alarms else None,
        "per_detector_alpha": alpha,
        "streams": int(sim.stats.shape[0]),
        "evaluations": int(sim.stats.shape[0] * sim.stats.shape[1]),
        "window": sim.window,
        "stride": sim.stride,
    }
    return th, report
