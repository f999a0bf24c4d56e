"""Mean shift in the full activation space, with a shrinkage covariance (no principal-subspace blind spot).

:class:`~monitor.analysis.detectors.meanshift.MeanShift` looks only at the top-k principal directions:
a shift that lives mostly outside them (a new token family nudging many low-variance directions)
goes unseen. This detector tests the window mean of the *whole* pooled activation against the
baseline mean with Hotelling's statistic ``T = W · m̄ᵀ Σ⁻¹ m̄ / d``, where ``Σ`` is the Ledoit–Wolf
shrinkage estimate of the baseline covariance (well conditioned even when ``d`` is close to the
number of reference records; Ledoit & Wolf 2004). ``T`` is ~1 under exchangeable no-drift windows;
thresholds come from calibration like every other detector's.

Cost: a record is only centred (``d`` numbers into the window sum); the ``d × d`` rotation runs once
per *evaluation* on the window mean, so the per-record cost stays O(d).

Attribution: the window's shift along the top principal directions (``pc1`` ...) in standard errors,
and ``outside_top<k>``: the square root of the part of ``T · d`` that lies outside them, so a
person sees whether the shift is in the usual directions of variation or a new one.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> ref = rng.normal(size=(3000, 64)) * np.linspace(3, 0.2, 64)      # variance concentrated in few directions
>>> det = FullMeanShift(k=4).fit(ref)
>>> shift = np.zeros(64); shift[40:] = 0.15                            # only low-variance directions move
>>> same = det.statistic(det.transform(rng.normal(size=(200, 64)) * np.linspace(3, 0.2, 64))[None])[0]
>>> moved = det.statistic(det.transform(rng.normal(size=(200, 64)) * np.linspace(3, 0.2, 64) + shift)[None])[0]
>>> bool(same < 2 < moved)
True
>>> det.component_names()[int(np.argmax(np.abs(det.components(det.transform(rng.normal(size=(200, 64)) + shift)))))]
'outside_top4'

References: Hotelling (1931); Ledoit & Wolf, "A well-conditioned estimator for large-dimensional
covariance matrices", J. Multivariate Analysis 2004.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf

from monitor.analysis.detectors.base import as_windows


class FullMeanShift:
    name = "meanshift_full"

    def __init__(self, k: int = 16) -> None:
        self.k = k

    def fit(self, reference: np.ndarray, groups: np.ndarray | None = None) -> FullMeanShift:
        x = np.asarray(reference, dtype=np.float64)
        self.mean_ = x.mean(axis=0)
        cov = LedoitWolf(assume_centered=False).fit(x).covariance_
        eigval, eigvec = np.linalg.eigh(cov)
        order = np.argsort(eigval)[::-1]
        self.eigval_ = np.maximum(eigval[order], 1e-12)
        self.eigvec_ = np.ascontiguousarray(eigvec[:, order].T)  # rows: directions, largest variance first
        return self

    def transform(self, x: np.ndarray, cache: dict | None = None) -> np.ndarray:
        return np.asarray(x, dtype=np.float64) - self.mean_

    def _whitened(self, mean: np.ndarray, size: int) -> np.ndarray:
        """Window means ``[n, d]`` -> shift along each eigendirection in standard errors ``[n, d]``."""
        return np.sqrt(size) * (mean @ self.eigvec_.T) / np.sqrt(self.eigval_)

    def statistic(self, windows: np.ndarray) -> np.ndarray:
        w = as_windows(windows)
        return self.statistic_from_mean(w.mean(axis=1), w.shape[1])

    def statistic_from_mean(self, mean: np.ndarray, size: int) -> np.ndarray:
        """The statistic from window means ``[n, d]`` (it depends on nothing else)."""
        z = self._whitened(mean, size)
        return (z**2).sum(axis=1) / z.shape[1]

    def components(self, window: np.ndarray) -> np.ndarray:
        w = as_windows(window)
        z = self._whitened(w.mean(axis=1), w.shape[1])[0]
        k = min(self.k, len(z))
        return np.concatenate([z[:k], [np.sqrt((z[k:] ** 2).sum())]])

    def component_names(self) -> list[str]:
        k = min(self.k, len(self.eigval_))
        return [f"pc{j + 1}" for j in range(k)] + [f"outside_top{k}"]

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean_, "eigval": self.eigval_, "eigvec": self.eigvec_, "k": np.array([self.k])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> FullMeanShift:
        det = cls(k=int(state["k"][0]))
        det.mean_, det.eigval_ = np.asarray(state["mean"]), np.asarray(state["eigval"])
        det.eigvec_ = np.ascontiguousarray(state["eigvec"])
        return det
