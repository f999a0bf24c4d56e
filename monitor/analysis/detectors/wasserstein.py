"""1-Wasserstein distance of a window against a reference, per component, in reference-sd units.

``W1 = ∫ |Q_window(u) − Q_reference(u)| du`` estimated on a grid of quantile levels, divided by the
reference's standard deviation so components on different scales (entropy in nats, distances in
tokens) can share one maximum. Unlike KS it grows with *how far* mass moved, not only whether it did.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> w = Wasserstein().fit(rng.normal(size=(5000, 1)))
>>> round(float(w.statistic(rng.normal(0.5, 1, size=(1, 2000, 1)))[0]), 1)
0.5

References: Villani, "Optimal Transport", 2009; ``scipy.stats.wasserstein_distance`` computes the
same distance exactly for a single pair of samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.analysis.detectors.base import Componentwise


class Wasserstein(Componentwise):
    name = "wasserstein"

    def __init__(self, grid: int = 64) -> None:
        self.grid = grid

    def fit(self, reference: np.ndarray) -> Wasserstein:
        ref = np.asarray(reference, dtype=np.float64)
        ref = ref[:, None] if ref.ndim == 1 else ref
        self.levels_ = (np.arange(self.grid) + 0.5) / self.grid
        self.quantiles_ = np.quantile(ref, self.levels_, axis=0).T  # [c, grid]
        self.scale_ = np.maximum(ref.std(axis=0), 1e-12)
        return self

    def _per_component(self, w: np.ndarray) -> np.ndarray:
        q = np.quantile(w, self.levels_, axis=1)  # [grid, n, c]
        diff = np.abs(q.transpose(1, 2, 0) - self.quantiles_[None])  # [n, c, grid]
        return diff.mean(axis=2) / self.scale_

    def state(self) -> dict[str, Any]:
        return {"levels": self.levels_, "quantiles": self.quantiles_, "scale": self.scale_}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Wasserstein:
        det = cls(grid=len(state["levels"]))
        det.levels_, det.quantiles_, det.scale_ = (np.asarray(state[k]) for k in ("levels", "quantiles", "scale"))
        return det
