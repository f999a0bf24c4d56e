"""Maximum mean discrepancy (RBF kernel) between a window and the baseline, on a PCA projection.

Activations are projected on the baseline's top-k whitened principal directions; the RBF kernel's
bandwidth is the median pairwise distance of baseline points (the median heuristic). The kernel is
approximated with D = 128 random Fourier features φ (Rahimi & Recht), so
``MMD² ≈ || mean_window φ(z) − mean_reference φ(z) ||²`` costs O(D) per record and the window
statistic is a difference of means: streaming-friendly, and cheap to calibrate by bootstrap.
Components (attribution) are the window's mean shift along each principal direction, in standard
errors, as for :class:`~monitor.analysis.detectors.meanshift.MeanShift`.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> ref = rng.normal(size=(3000, 16))
>>> det = MMD(k=4).fit(ref)
>>> same = det.statistic(det.transform(rng.normal(size=(200, 16)))[None])[0]
>>> wider = det.statistic(det.transform(rng.normal(size=(200, 16)) * 1.6)[None])[0]   # same mean, more spread
>>> bool(wider > 3 * same)
True

References: Gretton, Borgwardt, Rasch, Schölkopf, Smola, "A kernel two-sample test", JMLR 2012;
Rahimi & Recht, "Random features for large-scale kernel machines", NeurIPS 2007; Rabanser et al. 2019.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.analysis.detectors.base import as_windows
from monitor.analysis.detectors.projection import fit_pca, project


class MMD:
    name = "mmd"
    shares_pca = True  # fitted on the site's one PCA projection (baseline._fit_slots)

    def __init__(self, k: int = 16, features: int = 128, seed: int = 0) -> None:
        self.k = k
        self.features = features
        self.seed = seed

    def fit(self, reference: np.ndarray, pca: tuple | None = None, groups: np.ndarray | None = None) -> MMD:
        """Learn from reference activations; ``pca`` = a :func:`fit_pca` result to share between detectors.

        ``groups`` is accepted like every multivariate detector's; this one does not need it."""
        ref = np.asarray(reference, dtype=np.float64)
        self.mean_, self.components_, self.sd_ = pca or fit_pca(ref, self.k)
        z = project(ref, self.mean_, self.components_, self.sd_)
        rng = np.random.default_rng(self.seed)
        sub = z[rng.choice(len(z), size=min(len(z), 1000), replace=False)]
        d2 = ((sub[:, None, :] - sub[None, :, :]) ** 2).sum(-1)
        self.bandwidth_ = float(np.sqrt(np.median(d2[np.triu_indices(len(sub), 1)])))
        k = z.shape[1]
        self.omega_ = rng.normal(size=(k, self.features)) / self.bandwidth_
        self.phase_ = rng.uniform(0, 2 * np.pi, size=self.features)
        self.reference_mean_ = self._features(z).mean(axis=0)
        return self

    def _features(self, z: np.ndarray) -> np.ndarray:
        arg = (z @ self.omega_ + self.phase_).astype(np.float32)  # float32 cos: 2x faster, ample precision
        return np.sqrt(2.0 / self.features) * np.cos(arg, dtype=np.float32)

    def transform(self, x: np.ndarray, cache: dict | None = None) -> np.ndarray:
        """Per record: ``[random Fourier features (D) | whitened PC coordinates (k)]``."""
        z = np.asarray(project(x, self.mean_, self.components_, self.sd_, cache), dtype=np.float64)
        return np.concatenate([self._features(z), z], axis=1)

    def statistic(self, windows: np.ndarray) -> np.ndarray:
        w = as_windows(windows)
        return self.statistic_from_mean(w.mean(axis=1), w.shape[1])

    def statistic_from_mean(self, mean: np.ndarray, size: int) -> np.ndarray:
        """The statistic from window means ``[n, c]`` (it depends on nothing else)."""
        diff = mean[:, : self.features] - self.reference_mean_
        return (diff**2).sum(axis=1)

    def components(self, window: np.ndarray) -> np.ndarray:
        """Per principal direction, how far the window's distribution along it moved, mean *and* spread:
        ``sign(mean) * sqrt(A² + B²)`` with ``A = sqrt(n) * mean`` and ``B = sqrt(n / 2) * (mean square - 1)``
        of the whitened coordinate (each about standard normal without drift). A mixture that widens a
        direction without moving its mean shows here and not in ``meanshift``'s attribution."""
        w = as_windows(window)
        n = w.shape[1]
        z = w[0, :, self.features :]
        a = np.sqrt(n) * z.mean(axis=0)
        b = np.sqrt(n / 2.0) * ((z**2).mean(axis=0) - 1.0)
        return np.where(a < 0, -1.0, 1.0) * np.sqrt(a**2 + b**2)

    def component_names(self) -> list[str]:
        return [f"pc{j + 1}" for j in range(self.components_.shape[0])]

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean_, "components": self.components_, "sd": self.sd_, "omega": self.omega_,
                "phase": self.phase_, "reference_mean": self.reference_mean_,
                "bandwidth": np.array([self.bandwidth_])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> MMD:
        det = cls(k=len(state["sd"]), features=len(state["phase"]))
        for key in ("mean", "components", "sd", "omega", "phase", "reference_mean"):
            setattr(det, key + "_", np.asarray(state[key]))
        det.bandwidth_ = float(state["bandwidth"][0])
        return det
