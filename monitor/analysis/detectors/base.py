"""What every detector provides, and a sliding-window wrapper with ``update()`` per observation."""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import numpy as np


class Detector(Protocol):
    name: str

    def fit(self, reference: np.ndarray) -> Detector: ...
    def statistic(self, windows: np.ndarray) -> np.ndarray: ...
    def components(self, window: np.ndarray) -> np.ndarray: ...
    def state(self) -> dict[str, Any]: ...


def as_windows(x: np.ndarray) -> np.ndarray:
    """Accept ``[W]``, ``[W, c]`` or ``[n, W, c]``; return ``[n, W, c]`` float64."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[:, None]
    if x.ndim == 2:
        x = x[None]
    return x


class Componentwise:
    """A univariate test applied to every component of a window; the statistic is the largest.

    Subclasses implement ``_per_component(windows [n, W, c]) -> [n, c]``.
    """

    def _per_component(self, windows: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def transform(self, x: np.ndarray, cache: dict | None = None) -> np.ndarray:
        return np.asarray(x, dtype=np.float64)

    def statistic(self, windows: np.ndarray) -> np.ndarray:
        return self._per_component(as_windows(windows)).max(axis=1)

    def components(self, window: np.ndarray) -> np.ndarray:
        return self._per_component(as_windows(window))[0]


class StreamDetector:
    """Evaluate ``detector`` on the last ``window`` observations every ``stride`` observations.

    >>> import numpy as np
    >>> from monitor.analysis.detectors import KolmogorovSmirnov
    >>> rng = np.random.default_rng(0)
    >>> ks = KolmogorovSmirnov().fit(rng.normal(size=(2000, 1)))
    >>> stream = StreamDetector(ks, threshold=0.25, window=100, stride=10)
    >>> alarms = [stream.update([x]) for x in rng.normal(size=300)]   # no drift
    >>> any(alarms)
    False
    >>> alarms = [stream.update([x]) for x in rng.normal(1.0, 1, size=100)]  # the mean moves by 1 sd
    >>> any(alarms)
    True
    """

    def __init__(self, detector: Detector, threshold: float, window: int = 200, stride: int = 20) -> None:
        self.detector = detector
        self.threshold = threshold
        self.window = window
        self.stride = stride
        self._buf: deque = deque(maxlen=window)
        self._seen = 0
        self.value = float("nan")
        self.drift_detected = False

    def update(self, x: Any) -> bool:
        """Add one observation; True while the latest evaluation is above the threshold."""
        self._buf.append(np.asarray(x, dtype=np.float64).reshape(-1))
        self._seen += 1
        if len(self._buf) == self.window and self._seen % self.stride == 0:
            self.value = float(self.detector.statistic(np.stack(self._buf)[None])[0])
            self.drift_detected = self.value > self.threshold
        return self.drift_detected
