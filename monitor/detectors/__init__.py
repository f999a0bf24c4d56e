"""Drift detectors: one per module, each a statistic of a window of observations against a reference.

Every detector follows the scikit-learn convention (settings in the constructor, ``fit(reference)``
learns, learned state ends in ``_``) and exposes:

* ``statistic(windows)`` -- vectorized: ``windows`` ``[n, W, c]`` -> ``[n]`` statistics (larger = more drift),
  used both live and by calibration, which evaluates many bootstrap windows at once;
* ``components(window)`` -- ``[c]`` per-component contributions for attribution (which concept, head,
  principal direction moved).

Thresholds are not part of a detector: :mod:`monitor.calibration` sets them from a false-alarm budget.
:class:`~monitor.detectors.base.StreamDetector` wraps one detector with a sliding window and an
``update(x)`` per observation, in the style of river.
"""

from monitor.detectors.base import Detector, StreamDetector
from monitor.detectors.ks import KolmogorovSmirnov
from monitor.detectors.meanshift import MeanShift
from monitor.detectors.mmd import MMD
from monitor.detectors.pca_error import PCAReconstructionError
from monitor.detectors.psi import PSI
from monitor.detectors.rate import ConceptRate
from monitor.detectors.wasserstein import Wasserstein

UNIVARIATE = {"ks": KolmogorovSmirnov, "psi": PSI, "wasserstein": Wasserstein}

__all__ = ["MMD", "PSI", "UNIVARIATE", "ConceptRate", "Detector", "KolmogorovSmirnov", "MeanShift",
           "PCAReconstructionError", "StreamDetector", "Wasserstein"]
