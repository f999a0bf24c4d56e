"""Two-sample Kolmogorov–Smirnov statistic of a window against a reference, per component.

The statistic is ``max_c sup_x |F_window,c(x) − F_reference,c(x)|``: the largest distance between the
empirical distribution functions of any component. KS is distribution-free under no drift, so the
maximum over components (probe scores, attention-head statistics) compares like with like.

>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> ks = KolmogorovSmirnov().fit(rng.normal(size=(5000, 2)))
>>> same = ks.statistic(rng.normal(size=(1, 200, 2)))[0]
>>> moved = ks.statistic(rng.normal([0.0, 0.8], 1, size=(1, 200, 2)))[0]
>>> bool(same < 0.12 < moved)
True
>>> int(np.argmax(ks.components(rng.normal([0.0, 0.8], 1, size=(200, 2)))))
1

References: Kolmogorov (1933); Smirnov (1948); Rabanser, Günnemann, Lipton, "Failing loudly: an
empirical study of methods for detecting dataset shift", NeurIPS 2019 (KS on components with a
correction for their number).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from monitor.analysis.detectors.base import Componentwise


class KolmogorovSmirnov(Componentwise):
    name = "ks"

    def __init__(self, max_reference: int = 5000) -> None:
        self.max_reference = max_reference

    def fit(self, reference: np.ndarray) -> KolmogorovSmirnov:
        ref = np.asarray(reference, dtype=np.float64)
        ref = ref[:, None] if ref.ndim == 1 else ref
        self.reference_ = np.sort(ref[: self.max_reference], axis=0)  # [R, c]
        return self

    def _per_component(self, w: np.ndarray) -> np.ndarray:
        n, size, c = w.shape
        ref = self.reference_
        r = ref.shape[0]
        ws = np.sort(w, axis=1)
        i = np.arange(1, size + 1) / size  # window ECDF at its i-th smallest point
        out = np.empty((n, c))
        for j in range(c):  # c is small (concepts, heads x 4); each step is vectorized over windows
            f_right = np.searchsorted(ref[:, j], ws[:, :, j], side="right") / r
            f_left = np.searchsorted(ref[:, j], ws[:, :, j], side="left") / r
            # the sup of |F_w - F_r| is reached at a window point or just before one
            out[:, j] = np.maximum(i - f_right, f_left - (i - 1 / size)).max(axis=1)
        return out

    def state(self) -> dict[str, Any]:
        return {"reference": self.reference_}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> KolmogorovSmirnov:
        det = cls()
        det.reference_ = np.asarray(state["reference"], dtype=np.float64)
        return det
