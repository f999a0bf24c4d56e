"""Drift detectors: one per module, each a statistic of a window of observations against a reference.

Every detector follows the scikit-learn convention (settings in the constructor, ``fit(reference)``
learns, learned state ends in ``_``) and exposes:

* ``statistic(windows)`` -- vectorized: ``windows`` ``[n, W, c]`` -> ``[n]`` statistics (larger = more drift),
  used both live and by calibration, which evaluates many bootstrap windows at once;
* ``components(window)`` -- ``[c]`` per-component contributions for attribution (which concept, head,
  principal direction moved).

Thresholds are not part of a detector: :mod:`monitor.analysis.calibration` sets them from a false-alarm budget.
:class:`~monitor.analysis.detectors.base.StreamDetector` wraps one detector with a sliding window and an
``update(x)`` per observation, in the style of river.
"""

from monitor.analysis.detectors.base import Detector, StreamDetector
from monitor.analysis.detectors.ks import KolmogorovSmirnov
from monitor.analysis.detectors.meanshift import MeanShift
from monitor.analysis.detectors.meanshift_full import FullMeanShift
from monitor.analysis.detectors.mmd import MMD
from monitor.analysis.detectors.novelty import NearestNeighbourNovelty
from monitor.analysis.detectors.pca_error import PCAReconstructionError
from monitor.analysis.detectors.psi import PSI
from monitor.analysis.detectors.rate import ConceptRate
from monitor.analysis.detectors.wasserstein import Wasserstein

#: Every detector by the ``kind`` a baseline file stores: the one place a new detector is registered.
REGISTRY = {
    "ks": KolmogorovSmirnov, "psi": PSI, "wasserstein": Wasserstein,
    "mmd": MMD, "meanshift": MeanShift, "meanshift_full": FullMeanShift, "pca_error": PCAReconstructionError,
    "novelty": NearestNeighbourNovelty,
    "rate": ConceptRate,
}
UNIVARIATE = {"ks": KolmogorovSmirnov, "psi": PSI, "wasserstein": Wasserstein}

__all__ = ["MMD", "PSI", "REGISTRY", "UNIVARIATE", "ConceptRate", "Detector", "FullMeanShift", "KolmogorovSmirnov",
           "MeanShift", "NearestNeighbourNovelty", "PCAReconstructionError", "StreamDetector", "Wasserstein"]
