"""PCA reconstruction error: how much of a record's activation the baseline's subspace fails to explain.

The baseline's top-k principal directions capture how activations usually vary. A record from new
kinds of input has more energy outside that subspace. Each record becomes its relative residual
``||x − x̂||² / scale``; the statistic is the window's mean residual in baseline standard errors,
``(mean − μ) / (σ / sqrt(W))`` (one-sided: only *more* error is drift).

**Out of sample.** Residuals of the records a basis was fitted on are smaller than those of any new
record, so moments taken in-sample make the statistic run hot on fresh traffic of the same kind. The
basis is fitted on one half of the reference (by whole groups, see :mod:`monitor.analysis.groups`)
and ``scale``, ``μ``, ``σ`` are measured on the other half's residuals.

**Clipped.** A record's relative residual is clipped at ``clip_`` = the 0.99 quantile of those
out-of-sample residuals, so one extreme record moves a window statistic by at most
``clip_ / (σ sqrt(W))`` (stored as :attr:`max_step_`), and a handful of odd records cannot page
anyone: drift is many records with more error.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> basis = rng.normal(size=(4, 32))
>>> ref = rng.normal(size=(2000, 4)) @ basis + 0.1 * rng.normal(size=(2000, 32))
>>> det = PCAReconstructionError(k=4).fit(ref)
>>> same = det.statistic(det.transform(rng.normal(size=(200, 4)) @ basis + 0.1 * rng.normal(size=(200, 32)))[None])
>>> novel = det.statistic(det.transform(rng.normal(size=(200, 4)) @ basis + 0.3 * rng.normal(size=(200, 32)))[None])
>>> bool(abs(same[0]) < 4 < novel[0])
True

References: Jackson & Mudholkar, "Control procedures for residuals associated with principal
component analysis", Technometrics 1979 (the Q statistic).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.analysis import groups as grouping
from monitor.analysis.detectors.base import as_windows
from monitor.analysis.detectors.projection import fit_pca, projected_energy

CLIP_QUANTILE = 0.99


class PCAReconstructionError:
    name = "pca_error"

    def __init__(self, k: int = 16, seed: int = 0) -> None:
        self.k = k
        self.seed = seed

    def _residual(self, x: np.ndarray, cache: dict | None = None) -> np.ndarray:
        # the principal directions are orthonormal: residual energy = total − projected energy
        total, kept = projected_energy(x, self.mean_, self.components_, self.sd_, cache)
        return np.maximum(total - kept, 0.0)

    def fit(self, reference: np.ndarray, groups: np.ndarray | None = None) -> PCAReconstructionError:
        """Basis on one half of ``reference`` (whole ``groups``), moments and clip on the other half."""
        x = np.asarray(reference, dtype=np.float64)
        g = np.arange(len(x)) if groups is None else np.asarray(groups)
        basis_rows, moment_rows = grouping.halves(g, self.seed)
        self.mean_, self.components_, self.sd_ = fit_pca(x[basis_rows], self.k)
        r = self._residual(x[moment_rows])
        self.scale_ = float(max(r.mean(), 1e-12))
        rel = r / self.scale_
        self.clip_ = float(np.quantile(rel, CLIP_QUANTILE))
        rel = np.minimum(rel, self.clip_)
        self.mu_, self.sigma_ = float(rel.mean()), float(max(rel.std(), 1e-12))
        return self

    def transform(self, x: np.ndarray, cache: dict | None = None) -> np.ndarray:
        return np.minimum(self._residual(x, cache) / self.scale_, self.clip_)[:, None]

    def max_step(self, size: int) -> float:
        """The most one record can move the statistic of a window of ``size`` records."""
        return self.clip_ / (self.sigma_ * np.sqrt(size))

    def statistic(self, windows: np.ndarray) -> np.ndarray:
        w = as_windows(windows)
        return self.statistic_from_mean(w.mean(axis=1), w.shape[1])

    def statistic_from_mean(self, mean: np.ndarray, size: int) -> np.ndarray:
        """The statistic from window means ``[n, 1]`` (it depends on nothing else)."""
        return (mean[:, 0] - self.mu_) / (self.sigma_ / np.sqrt(size))

    def components(self, window: np.ndarray) -> np.ndarray:
        return self.statistic(window)

    def component_names(self) -> list[str]:
        return [f"energy outside the top {len(self.components_)} principal directions"]

    def state(self) -> dict[str, Any]:
        return {"mean": self.mean_, "components": self.components_, "sd": self.sd_,
                "moments": np.array([self.scale_, self.mu_, self.sigma_, self.clip_])}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> PCAReconstructionError:
        det = cls(k=len(state["components"]))
        det.mean_, det.components_, det.sd_ = (np.asarray(state[k]) for k in ("mean", "components", "sd"))
        det.scale_, det.mu_, det.sigma_, det.clip_ = (float(v) for v in state["moments"])
        return det
