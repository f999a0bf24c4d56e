"""Concept rate: the share of a window's requests whose probe score crosses the probe's threshold.

Each record becomes 0/1 per concept (score ≥ threshold). Against the baseline rate ``p0`` the
statistic is the largest one-sided z-score over concepts,
``z = (rate_window − p0) / sqrt(p0 (1 − p0) / W)``: a *surge* of jailbreak attempts or toxic
prompts, not a drop, is what pages someone. Components are the per-concept z-scores.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> det = ConceptRate(thresholds=[0.5]).fit(rng.uniform(size=(5000, 1)) * 0.6)   # ~17 % above 0.5
>>> z_same = det.statistic(det.transform(rng.uniform(size=(200, 1)) * 0.6)[None])[0]
>>> z_surge = det.statistic(det.transform(rng.uniform(size=(200, 1)) * 0.8)[None])[0]
>>> bool(z_same < 3 < z_surge)
True

References: a one-sided binomial (Shewhart p-chart) test; Montgomery, "Introduction to Statistical
Quality Control", ch. 7.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from monitor.analysis.detectors.base import as_windows
from monitor.probes.probe import hits


class ConceptRate:
    name = "rate"

    def __init__(self, thresholds: Sequence[float] = (0.5,), min_rate: float = 0.005) -> None:
        self.thresholds = np.asarray(thresholds, dtype=np.float64)
        self.min_rate = min_rate

    def transform(self, scores: np.ndarray, cache: dict | None = None) -> np.ndarray:
        return hits(np.asarray(scores, dtype=np.float64), self.thresholds).astype(np.float64)

    def fit(self, reference_scores: np.ndarray) -> ConceptRate:
        rates = self.transform(reference_scores).mean(axis=0)
        self.rate_ = np.clip(rates, self.min_rate, 1 - self.min_rate)  # never a zero-variance baseline
        self.baseline_rate_ = rates
        return self

    def _z(self, w: np.ndarray) -> np.ndarray:
        return self._z_from_mean(w.mean(axis=1), w.shape[1])

    def _z_from_mean(self, mean: np.ndarray, size: int) -> np.ndarray:
        return (mean - self.rate_) / np.sqrt(self.rate_ * (1 - self.rate_) / size)

    def statistic(self, windows: np.ndarray) -> np.ndarray:
        return self._z(as_windows(windows)).max(axis=1)

    def statistic_from_mean(self, mean: np.ndarray, size: int) -> np.ndarray:
        """The statistic from window means ``[n, c]`` (it depends on nothing else)."""
        return self._z_from_mean(mean, size).max(axis=1)

    def components(self, window: np.ndarray) -> np.ndarray:
        return self._z(as_windows(window))[0]

    def state(self) -> dict[str, Any]:
        return {"thresholds": self.thresholds, "rate": self.rate_, "baseline_rate": self.baseline_rate_,
                "min_rate": np.array([self.min_rate])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> ConceptRate:
        det = cls(thresholds=state["thresholds"], min_rate=float(state["min_rate"][0]))
        det.rate_, det.baseline_rate_ = np.asarray(state["rate"]), np.asarray(state["baseline_rate"])
        return det
