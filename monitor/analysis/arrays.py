"""The analyzer on plain arrays: numpy in, alarms out.

For comparing latentwatch's calibrated detectors with other drift libraries on the same data, or for
watching any embedding stream without the tap::

    >>> import numpy as np
    >>> from monitor.analysis.arrays import ArrayMonitor
    >>> rng = np.random.default_rng(0)
    >>> groups = np.repeat(np.arange(24), 50)                        # 24 documents of 50 records
    >>> ref = rng.normal(size=(1200, 8)) + rng.normal(0, 0.3, size=(24, 8))[groups]
    >>> mon = ArrayMonitor(window=50, stride=10, false_alarm_every=2000, pca_components=4).fit(ref, groups)
    >>> quiet = mon.update(rng.normal(size=(300, 8)) + rng.normal(0, 0.3, size=8))
    >>> moved = mon.update(rng.normal(size=(300, 8)) + 1.5)
    >>> len(quiet) <= 1 < len(moved)
    True

Every setting of :class:`~monitor.analysis.baseline.AnalyzerConfig` applies; ``groups`` (one label per
reference row: document, session, tenant, hour) drives the grouped cross-fit calibration. Without
``groups`` every row is its own group, which overstates the budget on grouped traffic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from monitor.analysis import signals
from monitor.analysis.analyzer import AlarmEvent, Analyzer
from monitor.analysis.baseline import AnalyzerConfig, Baseline

SITE = "x"
FAMILY = f"act:{SITE}"


class ArrayMonitor:
    """Calibrated multivariate drift detection on ``[n, d]`` arrays (settings as in ``AnalyzerConfig``)."""

    def __init__(self, *, window: int = 200, stride: int = 50, false_alarm_every: float = 20_000,
                 detectors: Sequence[str] = ("mmd", "meanshift", "meanshift_full", "pca_error", "novelty"),
                 **settings: Any) -> None:
        self.config = AnalyzerConfig(window=window, stride=stride, false_alarm_every=false_alarm_every,
                                     multivariate=list(detectors), univariate=[], concept_rates=False, **settings)

    def fit(self, reference: np.ndarray, groups: Sequence[Any] | np.ndarray | None = None) -> ArrayMonitor:
        """Fit every detector on ``reference`` ``[n, d]`` and calibrate thresholds (grouped by ``groups``)."""
        x = np.asarray(reference, dtype=np.float64)
        if x.ndim != 2 or not np.isfinite(x).all():
            raise ValueError(f"reference must be a finite [n, d] array, got shape {x.shape}")
        if groups is None:
            group_ids = np.arange(len(x))
            config = self.config.model_copy(update={"group_by": "record"})
        else:
            labels = np.asarray(groups)
            if labels.shape != (len(x),):
                raise ValueError(f"groups must hold one label per reference row ({len(x)}), got {labels.shape}")
            group_ids = np.unique(labels, return_inverse=True)[1]
            config = self.config.model_copy(update={"group_by": "meta:group"})
        shapes = {SITE: signals.SiteShape("resid", x.shape[1])}
        self.baseline_ = Baseline.from_signals({FAMILY: x}, group_ids, shapes, None, config, model="arrays",
                                               fingerprint=f"arrays:{x.shape[1]}")
        self.analyzer_ = Analyzer(self.baseline_, None, log_alarms=False)
        return self

    def update(self, x: np.ndarray) -> list[AlarmEvent]:
        """Feed rows ``[n, d]`` (or one row ``[d]``); returns the alarms that fired."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        d = self.baseline_.shapes[SITE].dim
        if x.shape[1] != d:
            raise ValueError(f"rows must have {d} columns like the reference, got {x.shape[1]}")
        return self.analyzer_.update_signals({FAMILY: x})

    @property
    def thresholds(self) -> dict[str, float]:
        return {s.name: s.threshold for s in self.baseline_.slots}

    @property
    def statistics(self) -> dict[str, float]:
        return {st.slot.name: st.value for st in self.analyzer_.states}

    @property
    def warnings(self) -> list[str]:
        return list(self.baseline_.info["warnings"])
