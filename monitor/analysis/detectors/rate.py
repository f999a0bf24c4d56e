"""Concept rate: the share of a window's requests whose probe score crosses the probe's threshold.

Each record becomes 0/1 per concept (score ≥ threshold, :func:`monitor.probes.probe.hits`). Against
the baseline rate ``p0`` of a concept, a window with ``h`` hits out of ``W`` gets the binomial upper
tail ``P(X ≥ h)``, ``X ~ Binomial(W, p0)``; the per-concept statistic is ``−log10`` of it, and the
detector's statistic is the largest over concepts. A *surge* of jailbreak attempts or toxic prompts,
not a drop, is what pages someone.

Why the exact tail and not a z-score: concepts are rare (``p0`` of 1 % or less on ordinary traffic),
and at a window of a few hundred records a z-score of a rare count is far from normal: its extreme
quantiles sit much higher than for a common concept, so a threshold on the *maximum* z would be set
by the rarest concept and blind the others. ``−log10`` tail probabilities compare concepts on one
scale. The threshold itself is not a fixed number: calibration sets it on simulated no-drift
streams with the other detectors (``monitor.analysis.calibration``), with the baseline's groups, so
the between-group variation of concept rates (overdispersion) is in it too.

Components (attribution and the per-concept surge metric) are the per-concept ``−log10`` tails.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> det = ConceptRate(thresholds=[0.5]).fit(rng.uniform(size=(5000, 1)) * 0.52)   # ~4 % above 0.5
>>> same = det.statistic(det.transform(rng.uniform(size=(200, 1)) * 0.52)[None])[0]
>>> surge = det.statistic(det.transform(rng.uniform(size=(200, 1)) * 0.6)[None])[0]   # ~17 %
>>> bool(same < 2 < 8 < surge)
True

References: the binomial (p-chart) test of a proportion; Montgomery, "Introduction to Statistical
Quality Control", ch. 7.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binom

from monitor.analysis.detectors.base import as_windows
from monitor.probes.probe import hits


class ConceptRate:
    name = "rate"

    def __init__(self, thresholds: Sequence[float] = (0.5,), min_rate: float = 0.002) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.min_rate = min_rate
        self._tables: dict[int, np.ndarray] = {}

    def transform(self, scores: np.ndarray, cache: dict | None = None) -> np.ndarray:
        return hits(np.asarray(scores, dtype=np.float64), self.thresholds).astype(np.float64)

    def fit(self, reference_scores: np.ndarray) -> ConceptRate:
        rates = self.transform(reference_scores).mean(axis=0)
        self.rate_ = np.clip(rates, self.min_rate, 1 - self.min_rate)  # never a zero-variance baseline
        self.baseline_rate_ = rates
        self._tables = {}
        return self

    def _table(self, size: int) -> np.ndarray:
        """``[size + 1, concepts]``: −log10 P(X ≥ h) for h = 0..size."""
        table = self._tables.get(size)
        if table is None:
            h = np.arange(size + 1)[:, None]
            table = -binom.logsf(h - 1, size, self.rate_[None, :]) / np.log(10)
            self._tables[size] = table = np.maximum(table, 0.0)
        return table

    def _tail(self, mean: np.ndarray, size: int) -> np.ndarray:
        count = np.clip(np.rint(mean * size).astype(np.int64), 0, size)
        return self._table(size)[count, np.arange(count.shape[1])]

    def statistic(self, windows: np.ndarray) -> np.ndarray:
        w = as_windows(windows)
        return self.statistic_from_mean(w.mean(axis=1), w.shape[1])

    def statistic_from_mean(self, mean: np.ndarray, size: int) -> np.ndarray:
        """The statistic from window means ``[n, c]`` (it depends on nothing else)."""
        return self._tail(np.asarray(mean), size).max(axis=1)

    def components(self, window: np.ndarray) -> np.ndarray:
        w = as_windows(window)
        return self._tail(w.mean(axis=1), w.shape[1])[0]

    def state(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, "rate": self.rate_, "baseline_rate": self.baseline_rate_,
                "min_rate": np.array([self.min_rate])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ConceptRate:
        det = cls(thresholds=state["thresholds"], min_rate=float(state["min_rate"][0]))
        det.rate_, det.baseline_rate_ = np.asarray(state["rate"]), np.asarray(state["baseline_rate"])
        return det
