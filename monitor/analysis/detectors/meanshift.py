"""Mean shift of a window in the baseline's whitened principal-component space (Hotelling-style).

Each record's pooled activation is projected on the top-k principal directions of the baseline and
whitened (unit variance per direction). Under no drift the window mean of these coordinates is ~0
with variance 1/W per direction, so ``T = W · ||mean_window(z)||² / k`` is ~1 (Hotelling's T² with
the baseline covariance as known, divided by k). The components are ``sqrt(W) · mean_window(z_j)``:
how many standard errors the window moved along principal direction j, which is the attribution.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> ref = rng.normal(size=(2000, 32))
>>> det = MeanShift(k=4).fit(ref)
>>> z = det.transform(rng.normal(size=(200, 32)))
>>> bool(det.statistic(z[None])[0] < 3)
True
>>> shifted = det.transform(rng.normal(size=(200, 32)) + 0.5 * det.components_[0] * det.sd_[0])
>>> int(np.argmax(np.abs(det.components(shifted))))
0

References: Hotelling, "The generalization of Student's ratio", 1931; Rabanser et al., NeurIPS 2019
(dimensionality reduction before two-sample tests).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.analysis.detectors.base import as_windows
from monitor.analysis.detectors.projection import fit_pca, project


class MeanShift:
    name = "meanshift"
    shares_pca = True  # fitted on the site's one PCA projection (baseline._fit_slots)

    def __init__(self, k: int = 16) -> None:
        self.k = k

    def fit(self, reference: np.ndarray, pca: tuple | None = None, groups: np.ndarray | None = None) -> MeanShift:
        """Learn from reference activations; ``pca`` = a :func:`fit_pca` result to share between detectors.

        ``groups`` is accepted like every multivariate detector's; this one does not need it."""
        self.mean_, self.components_, self.sd_ = pca or fit_pca(reference, self.k)
        return self

    def transform(self, x: np.ndarray, cache: dict | None = None) -> np.ndarray:
        return np.asarray(project(x, self.mean_, self.components_, self.sd_, cache), dtype=np.float64)

    def statistic(self, windows: np.ndarray) -> np.ndarray:
        w = as_windows(windows)
        return self.statistic_from_mean(w.mean(axis=1), w.shape[1])

    def statistic_from_mean(self, mean: np.ndarray, size: int) -> np.ndarray:
        """The statistic from window means ``[n, c]`` (it depends on nothing else)."""
        return size * (mean**2).sum(axis=1) / mean.shape[1]

    def components(self, window: np.ndarray) -> np.ndarray:
        w = as_windows(window)
        return np.sqrt(w.shape[1]) * w.mean(axis=1)[0]

    def component_names(self) -> list[str]:
        return [f"pc{j + 1}" for j in range(self.components_.shape[0])]

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean_, "components": self.components_, "sd": self.sd_}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> MeanShift:
        det = cls(k=len(state["sd"]))
        det.mean_, det.components_, det.sd_ = (np.asarray(state[k]) for k in ("mean", "components", "sd"))
        return det
