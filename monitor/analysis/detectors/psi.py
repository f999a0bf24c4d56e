"""Population Stability Index of a window against a reference, per component.

Bins are the reference's deciles (so every bin holds ~10 % of the reference), and
``PSI = Σ_bins (p_window − p_reference) · ln(p_window / p_reference)`` with a small floor on empty
bins. The statistic is the largest PSI over components. The rule of thumb "PSI > 0.25 is a major
shift" ignores the window size; latentwatch calibrates the threshold instead.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> psi = PSI().fit(rng.normal(size=(5000, 1)))
>>> bool(psi.statistic(rng.normal(size=(1, 500, 1)))[0] < 0.1 < psi.statistic(rng.normal(1, 1, size=(1, 500, 1)))[0])
True

References: Yurdakul, "Statistical properties of population stability index", 2018;
Siddiqi, "Credit Risk Scorecards", 2006.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.analysis.detectors.base import Componentwise


class PSI(Componentwise):
    name = "psi"

    def __init__(self, bins: int = 10, floor: float = 1e-3) -> None:
        self.bins = bins
        self.floor = floor

    def fit(self, reference: np.ndarray) -> PSI:
        ref = np.asarray(reference, dtype=np.float64)
        ref = ref[:, None] if ref.ndim == 1 else ref
        qs = np.linspace(0, 1, self.bins + 1)[1:-1]
        self.edges_ = np.quantile(ref, qs, axis=0).T  # [c, bins-1]
        self.expected_ = np.stack([self._hist(ref[None, :, j], self.edges_[j])[0] for j in range(ref.shape[1])])
        return self

    def _hist(self, w: np.ndarray, edges: np.ndarray) -> np.ndarray:
        """Bin shares ``[n, bins]`` of windows ``[n, W]`` (one bincount for all windows)."""
        n = w.shape[0]
        idx = np.searchsorted(edges, w, side="right") + self.bins * np.arange(n)[:, None]
        counts = np.bincount(idx.ravel(), minlength=n * self.bins).reshape(n, self.bins)
        return np.maximum(counts / w.shape[1], self.floor)

    def _per_component(self, w: np.ndarray) -> np.ndarray:
        out = np.empty((w.shape[0], w.shape[2]))
        for j in range(w.shape[2]):
            p = self._hist(w[:, :, j], self.edges_[j])
            q = self.expected_[j]
            out[:, j] = ((p - q) * np.log(p / q)).sum(axis=1)
        return out

    def state(self) -> dict[str, Any]:
        return {"edges": self.edges_, "expected": self.expected_, "bins": np.array([self.bins])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> PSI:
        det = cls(bins=int(state["bins"][0]))
        det.edges_, det.expected_ = np.asarray(state["edges"]), np.asarray(state["expected"])
        return det
