"""Nearest-neighbour novelty: the share of a window's records unlike anything in the baseline.

Mean-based tests are weak against *mixtures*: when 10 % of the traffic becomes a new kind of
request, the window mean moves by a tenth of the difference. This detector looks at records one by
one. Each record is placed in the baseline's whitened principal-component space plus one coordinate
for its residual off that subspace (so novelty outside the subspace counts), and its distance to the
``neighbours``-th nearest of up to ``max_reference`` baseline records is compared with ``tau_``: the
``1 − expected`` quantile of the same distance for baseline records the reference set does not hold
(a split by whole groups). A record beyond ``tau_`` is *novel*; the statistic is the window's novel
share in binomial standard errors, ``(share − expected) / sqrt(expected (1 − expected) / W)``.

Under no drift about ``expected`` (5 %) of records are novel. One record moves the share by ``1/W``
at most, whatever its values. Attribution: ``novel_share``, the share itself, which an on-call
person reads directly ("23 % of requests look like nothing in the baseline; 5 % expected").

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> ref = rng.normal(size=(3000, 32))
>>> det = NearestNeighbourNovelty(k=8).fit(ref)
>>> same = det.components(det.transform(rng.normal(size=(400, 32))))[0]
>>> mixed = np.concatenate([rng.normal(size=(360, 32)), rng.normal(size=(40, 32)) + 3.0])  # a 10 % mixture
>>> novel = det.components(det.transform(mixed))[0]
>>> bool(same < 0.1 < 0.12 < novel)
True

References: the k-NN two-sample idea of Schilling (JASA 1986) and Henze (Annals of Statistics 1988);
conformal novelty scores, e.g. Bates et al., "Testing for outliers with conformal p-values",
Annals of Statistics 2023.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.analysis import groups as grouping
from monitor.analysis.detectors.base import as_windows
from monitor.analysis.detectors.projection import fit_pca, project, projected_energy


class NearestNeighbourNovelty:
    name = "novelty"
    shares_pca = True

    def __init__(self, k: int = 16, neighbours: int = 5, expected: float = 0.05, max_reference: int = 1000,
                 seed: int = 0) -> None:
        self.k = k
        self.neighbours = neighbours
        self.expected = expected
        self.max_reference = max_reference
        self.seed = seed

    def _coords(self, x: np.ndarray, cache: dict | None = None) -> np.ndarray:
        cache = {} if cache is None else cache
        z = project(x, self.mean_, self.components_, self.sd_, cache)
        total, kept = projected_energy(x, self.mean_, self.components_, self.sd_, cache)
        res = (np.sqrt(np.maximum(total - kept, 0.0)) - self.res_center_) / self.res_scale_
        return np.concatenate([np.asarray(z, dtype=np.float64), res[:, None]], axis=1)

    def _distance(self, c: np.ndarray) -> np.ndarray:
        ref = self.reference_
        d2 = (c**2).sum(1)[:, None] + self.ref_sq_[None, :] - 2.0 * (c @ ref.T)
        kth = np.partition(d2, self.neighbours - 1, axis=1)[:, self.neighbours - 1]
        return np.sqrt(np.maximum(kth, 0.0))

    def fit(self, reference: np.ndarray, pca: tuple | None = None, groups: np.ndarray | None = None
            ) -> NearestNeighbourNovelty:
        x = np.asarray(reference, dtype=np.float64)
        self.mean_, self.components_, self.sd_ = pca or fit_pca(x, self.k)
        g = np.arange(len(x)) if groups is None else np.asarray(groups)
        ref_rows, cal_rows = grouping.halves(g, self.seed)
        total, kept = projected_energy(x[ref_rows], self.mean_, self.components_, self.sd_)
        r = np.sqrt(np.maximum(total - kept, 0.0))
        self.res_center_, self.res_scale_ = float(r.mean()), float(max(r.std(), 1e-12))
        rng = np.random.default_rng(self.seed)
        ref_idx = np.flatnonzero(ref_rows)
        if len(ref_idx) > self.max_reference:
            ref_idx = np.sort(rng.choice(ref_idx, self.max_reference, replace=False))
        self.reference_ = self._coords(x[ref_idx])
        self.ref_sq_ = (self.reference_**2).sum(1)
        self.tau_ = float(np.quantile(self._distance(self._coords(x[cal_rows])), 1 - self.expected))
        return self

    def transform(self, x: np.ndarray, cache: dict | None = None) -> np.ndarray:
        return (self._distance(self._coords(x, cache)) > self.tau_).astype(np.float64)[:, None]

    def statistic(self, windows: np.ndarray) -> np.ndarray:
        w = as_windows(windows)
        return self.statistic_from_mean(w.mean(axis=1), w.shape[1])

    def statistic_from_mean(self, mean: np.ndarray, size: int) -> np.ndarray:
        """The statistic from window means ``[n, 1]`` (it depends on nothing else)."""
        q = self.expected
        return (mean[:, 0] - q) / np.sqrt(q * (1 - q) / size)

    def components(self, window: np.ndarray) -> np.ndarray:
        return as_windows(window).mean(axis=1)[0]

    def component_names(self) -> list[str]:
        return ["novel_share"]

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean_, "components": self.components_, "sd": self.sd_, "reference": self.reference_,
                "settings": np.array([self.neighbours, self.expected, self.tau_, self.res_center_, self.res_scale_])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> NearestNeighbourNovelty:
        neighbours, expected, tau, center, scale = (float(v) for v in state["settings"])
        det = cls(k=len(state["sd"]), neighbours=int(neighbours), expected=expected)
        det.mean_, det.components_, det.sd_ = (np.asarray(state[k]) for k in ("mean", "components", "sd"))
        det.reference_ = np.asarray(state["reference"], dtype=np.float64)
        det.ref_sq_ = (det.reference_**2).sum(1)
        det.tau_, det.res_center_, det.res_scale_ = tau, center, scale
        return det
